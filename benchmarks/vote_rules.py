"""Vote rules of a bagged classifier compared on the same trained members, from `bench_bagging.py --dump_probs`.

    python benchmarks/vote_rules.py DUMP_FOLDER [--result_name NAME]

Each seed's members are trained once by the benchmark; this script recombines their saved class probabilities
(training, held-out and same-pool splits) under every rule and temperature fit, and scores them against the single
model of the same seed. Rules: the soft vote (mean of probabilities) uncalibrated, with the temperature fitted on each
example's out-of-bag vote (the rule before `calibrate_vote` fitted on the examples out of every bag), and with the
temperature fitted on the full vote of the examples no member drew (`calibrate_vote` now); the geometric vote (mean of
log-probabilities, renormalised), uncalibrated and with a temperature fitted out of every bag; and members calibrated
one by one on their own out-of-bag examples, then averaged (and that vote's temperature out of every bag). A seed
with fewer than `MIN_CALIBRATION_EXAMPLES` training examples out of every bag (small training sets, where bootstrap
draws leave almost none) skips the rules fitted on them: its table says so instead of scoring a fit on a handful.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _common import write_result

from hf_interop.ensemble.bagging import MIN_CALIBRATION_EXAMPLES
from hf_interop.ensemble.calibration import classification_scores, fit_temperature
from hf_interop.ensemble.resampling import oob_vote, out_of_bag_mask

SPLITS = ("held_out", "same_pool")
METRICS = ("accuracy", "ECE", "mean confidence", "log loss")


def scores(log_vote: torch.Tensor, labels: torch.Tensor) -> list[float]:
    values = classification_scores(log_vote, labels)
    return [values[key] for key in ("accuracy", "ece", "confidence", "log_loss")]


def geometric(probabilities: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(probabilities.clamp_min(1e-300).log().mean(0), -1)


def seed_rules(bagging: dict, one: dict) -> tuple[dict, dict]:
    """Every rule's scores on both splits for one seed, and the fitted temperatures."""
    train = torch.from_numpy(bagging["train_probabilities"])
    labels = torch.from_numpy(bagging["train_labels"])
    members, examples = train.shape[:2]
    mask = out_of_bag_mask([bagging[f"draw_{index}"] for index in range(members)], examples)
    votes, covered = oob_vote(train, mask)
    untouched = torch.from_numpy(mask.all(0))
    member_temperatures = [
        fit_temperature(train[m, torch.from_numpy(mask[m])].log(), labels[torch.from_numpy(mask[m])])
        for m in range(members)
    ]

    def members_calibrated(probabilities: torch.Tensor) -> torch.Tensor:
        rescaled = [torch.softmax(probabilities[m].log() / member_temperatures[m], -1) for m in range(members)]
        return torch.stack(rescaled).mean(0).log()

    temperatures = {"out-of-bag votes": fit_temperature(votes[covered].log(), labels[covered])}
    every_bag = int(untouched.sum()) >= MIN_CALIBRATION_EXAMPLES
    if every_bag:
        temperatures.update(
            {
                "out of every bag": fit_temperature(train[:, untouched].mean(0).log(), labels[untouched]),
                "geometric, out of every bag": fit_temperature(geometric(train[:, untouched]), labels[untouched]),
                "calibrated members, out of every bag": fit_temperature(
                    members_calibrated(train[:, untouched]), labels[untouched]
                ),
            }
        )
    rules = {
        "one model": (one, lambda p: p[0].log()),
        "soft vote": (bagging, lambda p: p.mean(0).log()),
        "soft vote, temperature on out-of-bag votes": (
            bagging,
            lambda p: p.mean(0).log() / temperatures["out-of-bag votes"],
        ),
        "soft vote, temperature out of every bag (calibrate_vote)": (
            bagging,
            lambda p: p.mean(0).log() / temperatures["out of every bag"],
        ),
        "geometric vote": (bagging, geometric),
        "geometric vote, temperature out of every bag": (
            bagging,
            lambda p: geometric(p) / temperatures["geometric, out of every bag"],
        ),
        "members calibrated out of bag, then averaged": (bagging, members_calibrated),
        "... and that vote's temperature out of every bag": (
            bagging,
            lambda p: members_calibrated(p) / temperatures["calibrated members, out of every bag"],
        ),
    }
    if not every_bag:
        rules = {name: rule for name, rule in rules.items() if "out of every bag" not in name}
    results = {}
    for name, (source, rule) in rules.items():
        row = []
        for split in SPLITS:
            probabilities = torch.from_numpy(source[f"{split}_probabilities"])
            row += scores(rule(probabilities), torch.from_numpy(source[f"{split}_labels"]))
        results[name] = row
    temperatures["examples out of every bag"] = int(untouched.sum())
    return results, temperatures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dumps", help="the --dump_probs folder of bench_bagging.py")
    parser.add_argument("--result_name", default="bagging_vote_rules")
    options = parser.parse_args()
    paths = sorted(Path(options.dumps).glob("seed*_bagging.npz"))
    if not paths:
        raise SystemExit(f"no seed*_bagging.npz in {options.dumps}: run bench_bagging.py with --dump_probs first.")
    per_seed, fits = {}, {}
    for path in paths:
        seed = path.name.split("_")[0]
        bagging = dict(np.load(path))
        one = dict(np.load(path.with_name(path.name.replace("_bagging", "_one_model"))))
        per_seed[seed], fits[seed] = seed_rules(bagging, one)
    header = " | ".join(f"{split.replace('_', '-')} {metric}" for split in SPLITS for metric in METRICS)
    lines = [
        f"Dumps: `{options.dumps}` ({', '.join(per_seed)}), mean +- standard error over seeds. Held-out = other "
        "documents; same-pool = new paragraphs of the training files.",
        "",
        f"| rule | {header} |",
        "|---" * (1 + len(SPLITS) * len(METRICS)) + "|",
    ]
    names = list(dict.fromkeys(name for rules in per_seed.values() for name in rules))
    for name in names:
        scored = [seed for seed in per_seed if name in per_seed[seed]]
        values = np.asarray([per_seed[seed][name] for seed in scored])
        error = values.std(0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.zeros(values.shape[1])
        cells = " | ".join(f"{m:.3f} +- {e:.3f}" for m, e in zip(values.mean(0), error, strict=True))
        seeds_note = "" if len(scored) == len(per_seed) else f" ({', '.join(scored)} only)"
        lines.append(f"| {name}{seeds_note} | {cells} |")
    skipped = [seed for seed, fit in fits.items() if "out of every bag" not in fit]
    if skipped:
        lines += [
            "",
            f"Rules fitted out of every bag are left out for {', '.join(skipped)}: fewer than "
            f"{MIN_CALIBRATION_EXAMPLES} training examples out of every bag (counts below).",
        ]
    lines += ["", "Fitted temperatures per seed:", ""]
    for seed, fit in fits.items():
        lines.append(
            f"- {seed}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in fit.items())
        )
    write_result(options.result_name, "\n".join(lines), {"per_seed": per_seed, "temperatures": fits})


if __name__ == "__main__":
    main()
