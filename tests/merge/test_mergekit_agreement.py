"""Agreement with mergekit (https://github.com/arcee-ai/mergekit, the test extra installs it): the same tiny
checkpoints merged with the same parameters by both, tensor by tensor, for every method both implement.

Equal within 1e-6: linear, task_arithmetic, ties, breadcrumbs, model_stock, slerp (each tensor one vector), and
(with mergekit's random masks replaced by ours) dare_linear and dare_ties once mergekit's rescaling is set to ours;
della and della_linear have the same keep probabilities, drops and sign election. Where the two differ by design,
the difference is pinned here and documented in `hf_interop.merge.methods`:

- DARE and DELLA rescaling: we divide each kept entry by its keep probability (`1 / density` for DARE, `1 / p_i`
  for DELLA), as both papers do (https://huggingface.co/papers/2311.03099, https://huggingface.co/papers/2406.11617),
  which keeps the task vector unbiased; mergekit (`rescale=True`, its default) multiplies the masked task vector by
  `|delta|_1 / |masked delta|_1` so that its L1 norm is unchanged.
- dare_ties: we take TIES' disjoint mean over the entries that agree with the elected sign (DARE's paper applies
  DARE before TIES); mergekit's default `normalize=False` sums them instead.
- Trimming counts (ties, breadcrumbs): we keep `ceil(density * n)` entries, mergekit `int(density * n)`; they agree
  whenever `density * n` is an integer (the case below) and we keep one more entry otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch
from merge_helpers import load_state

mergekit_api = pytest.importorskip(
    "mergekit.merge_methods.api", reason="mergekit is not installed (pip install 'hf_interop[test]')"
)
mergekit_sparsify = pytest.importorskip("mergekit.sparsify")

from hf_interop import merge_checkpoints  # noqa: E402
from hf_interop.merge import dare_keep_mask, della_keep_probabilities, magnitude_trim, seeded_uniforms  # noqa: E402
from hf_interop.merge.methods import _disjoint_merge  # noqa: E402

WEIGHTS = [0.7, 1.2, 0.5]


@pytest.fixture(scope="module")
def states(merge_family):
    return {
        "base": load_state(merge_family["base"]),
        "children": [load_state(child) for child in merge_family["children"]],
    }


def _mergekit(method, states, name, parameters, with_base=True):
    tensors = [state[name] for state in states["children"]]
    if with_base == "first":  # slerp: mergekit's "base" is the t = 0 end, our first checkpoint
        return mergekit_api.merge_tensors(tensors[:2], method, parameters=parameters, base_index=0)
    if with_base:
        return mergekit_api.merge_tensors(
            [states["base"][name], *tensors], method, parameters=parameters, base_index=0
        )
    return mergekit_api.merge_tensors(tensors, method, parameters=parameters)


def _ours(merge_family, tmp_path, method, **kwargs):
    base = None if method in ("linear", "slerp") else merge_family["base"]
    children = merge_family["children"][:2] if method == "slerp" else merge_family["children"]
    return load_state(
        merge_checkpoints(children, method, base=base, output_dir=tmp_path / method, show_progress=False, **kwargs)
    )


class _MasksFromUs:
    """Stands in for the `torch` module inside `mergekit.sparsify`: its `bernoulli` returns the masks of
    hf_interop's seeded draws (in the order mergekit asks for them: one per fine-tune) and records the keep
    probabilities mergekit asked with."""

    def __init__(self, masks):
        self.masks = list(masks)
        self.probabilities = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def bernoulli(self, probabilities):
        self.probabilities.append(probabilities.clone())
        return self.masks.pop(0).to(probabilities.dtype).reshape(probabilities.shape)


@pytest.mark.parametrize(
    "method,ours_kwargs,mergekit_parameters,with_base",
    [
        ("linear", dict(weights=WEIGHTS), dict(weight=WEIGHTS), False),
        ("task_arithmetic", dict(weights=WEIGHTS), dict(weight=WEIGHTS), True),
        ("ties", dict(weights=WEIGHTS, density=0.5), dict(weight=WEIGHTS, density=0.5), True),
        (
            "breadcrumbs",
            dict(weights=WEIGHTS, density=0.5, gamma=1 / 16),
            dict(weight=WEIGHTS, density=0.5, gamma=1 / 16),
            True,
        ),
        ("model_stock", {}, {}, True),
        ("slerp", dict(slerp_t=0.3), dict(t=0.3), "first"),
    ],
)
def test_deterministic_methods_equal_mergekit(
    merge_family, states, tmp_path, method, ours_kwargs, mergekit_parameters, with_base
):
    ours = _ours(merge_family, tmp_path, method, **ours_kwargs)
    for name in states["base"]:
        theirs = _mergekit(method, states, name, mergekit_parameters, with_base)
        assert theirs.dtype == ours[name].dtype
        torch.testing.assert_close(ours[name], theirs, rtol=0, atol=1e-6, msg=f"{method}: {name}")


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_mergekit_with_the_same_masks_and_rescaling(merge_family, states, tmp_path, monkeypatch, method):
    density, seed = 0.6, 5
    ours = _ours(merge_family, tmp_path, method, weights=WEIGHTS, density=density, seed=seed)
    for name in states["base"]:
        shape = states["base"][name].shape

        def masks():
            return [dare_keep_mask(shape, density, seed, name, index) for index in range(3)]  # noqa: B023

        # our 1 / density rescaling is mergekit's lambda; our disjoint mean is its normalize=True
        monkeypatch.setattr(mergekit_sparsify, "torch", _MasksFromUs(masks()))
        parameters = dict(weight=WEIGHTS, density=density, rescale=False, normalize=method == "dare_ties")
        parameters["lambda"] = 1 / density
        theirs = _mergekit(method, states, name, parameters)
        torch.testing.assert_close(ours[name], theirs, rtol=0, atol=1e-6, msg=f"{method}: {name}")

        # pinned difference: mergekit's defaults rescale to the L1 norm and (dare_ties) sum instead of averaging
        monkeypatch.setattr(mergekit_sparsify, "torch", _MasksFromUs(masks()))
        defaults = _mergekit(method, states, name, dict(weight=WEIGHTS, density=density))
        base = states["base"][name]
        deltas = []
        for mask, state in zip(masks(), states["children"], strict=True):
            delta = state[name] - base
            masked = delta * mask
            deltas.append(masked * (delta.abs().sum() / masked.abs().sum()))
        weighted = [w * d for w, d in zip(WEIGHTS, deltas, strict=True)]
        if method == "dare_linear":
            expected = base + sum(weighted)
        else:
            sign = torch.where(sum(weighted) >= 0, 1.0, -1.0)
            expected = base + sum(torch.where(torch.sign(d) == sign, d, 0.0) for d in weighted)
        torch.testing.assert_close(defaults, expected, rtol=0, atol=1e-6, msg=f"{method} defaults: {name}")


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_has_mergekits_keep_probabilities_and_differs_only_in_rescaling(
    merge_family, states, tmp_path, monkeypatch, method
):
    density, epsilon, seed = 0.5, 0.1, 2
    ours = _ours(merge_family, tmp_path, method, weights=WEIGHTS, density=density, epsilon=epsilon, seed=seed)
    checked = 0
    for name in states["base"]:
        base = states["base"][name]
        deltas = [state[name] - base for state in states["children"]]
        probabilities = [della_keep_probabilities(delta, density, epsilon) for delta in deltas]
        masks = [seeded_uniforms(base.shape, seed, name, index) < probabilities[index] for index in range(len(deltas))]
        for rescale in (False, True):
            stand_in = _MasksFromUs(masks)
            monkeypatch.setattr(mergekit_sparsify, "torch", stand_in)
            theirs = _mergekit(
                method, states, name, dict(weight=WEIGHTS, density=density, epsilon=epsilon, rescale=rescale)
            )
            # the same keep probabilities (magnitude ranks within each row)...
            for asked, ours_probabilities in zip(stand_in.probabilities, probabilities, strict=True):
                torch.testing.assert_close(asked.reshape(base.shape), ours_probabilities, rtol=0, atol=1e-6)
            # ...the same drops and the same election; only the rescaling of the kept entries differs
            if rescale:
                kept = [d * m * (d.abs().sum() / (d * m).abs().sum()) for d, m in zip(deltas, masks, strict=True)]
            else:
                kept = [d * m for d, m in zip(deltas, masks, strict=True)]
            if method == "della":
                expected = base + _disjoint_merge(kept, WEIGHTS)
            else:
                expected = base + sum(w * k for w, k in zip(WEIGHTS, kept, strict=True))
            torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-6, msg=f"{method}: {name}")
        ours_kept = [torch.where(m, d / p, 0.0) for d, m, p in zip(deltas, masks, probabilities, strict=True)]
        if method == "della":
            expected_ours = base + _disjoint_merge(ours_kept, WEIGHTS)
        else:
            expected_ours = base + sum(w * k for w, k in zip(WEIGHTS, ours_kept, strict=True))
        torch.testing.assert_close(ours[name], expected_ours, rtol=0, atol=1e-6, msg=name)
        checked += 1
    assert checked == len(states["base"])


def test_trimming_keeps_one_more_entry_than_mergekit_when_density_times_size_is_fractional():
    delta = torch.tensor([0.5, -0.1, 0.3, -0.7, 0.2, 0.05, -0.4])
    ours = magnitude_trim(delta, 0.5)
    theirs = mergekit_sparsify.magnitude(delta, 0.5)
    assert int((ours != 0).sum()) == math.ceil(3.5) and int((theirs != 0).sum()) == int(3.5)
    assert torch.equal(torch.where(theirs != 0, ours, 0.0), theirs)  # the entries mergekit keeps, we keep too
