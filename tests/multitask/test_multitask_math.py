"""The pure parts of multi-task training: task sampling against its formulas, and each weighting method against a
float64 reference or a closed form (static sum, Kendall's uncertainty weighting on a synthetic regression, PCGrad)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_interop.multitask.sampling import TaskBatchSampler, task_probabilities, task_schedule
from hf_interop.multitask.weighting import (
    check_task_weights,
    effective_weights,
    pcgrad_combine,
    static_weighted_sum,
    uncertainty_weighted_sum,
)

SIZES = [100, 400, 2500]
NUM_STEPS = 20000


# ---------------------------------------------------------------------------------------------------------------
# sampling


@pytest.mark.parametrize(
    ("strategy", "temperature", "expected"),
    [
        ("proportional", 1.0, [n / sum(SIZES) for n in SIZES]),
        ("temperature", 2.0, [n**0.5 / sum(m**0.5 for m in SIZES) for n in SIZES]),
        ("temperature", 5.0, [n**0.2 / sum(m**0.2 for m in SIZES) for n in SIZES]),
        ("round_robin", 1.0, [1 / 3] * 3),
    ],
)
def test_task_frequencies_match_their_formula(strategy, temperature, expected):
    assert task_probabilities(SIZES, strategy, temperature) == pytest.approx(expected, rel=1e-12)
    schedule = task_schedule(SIZES, strategy, NUM_STEPS, seed=3, temperature=temperature)
    counts = [schedule.count(task) for task in range(len(SIZES))]
    for count, probability in zip(counts, expected, strict=True):
        if strategy == "round_robin":  # deterministic: exactly its share, in turn
            assert abs(count - probability * NUM_STEPS) <= 1
        else:  # within 4.5 binomial standard deviations
            sigma = math.sqrt(NUM_STEPS * probability * (1 - probability))
            assert abs(count - probability * NUM_STEPS) <= 4.5 * sigma, (counts, expected)
    if strategy == "round_robin":
        assert schedule[:6] == [0, 1, 2, 0, 1, 2]


def test_temperature_one_is_proportional_and_high_temperature_tends_to_uniform():
    assert task_probabilities(SIZES, "temperature", 1.0) == pytest.approx(task_probabilities(SIZES, "proportional"))
    assert task_probabilities(SIZES, "temperature", 1e6) == pytest.approx([1 / 3] * 3, abs=1e-5)


def test_schedule_depends_on_seed_and_epoch_only():
    first = task_schedule(SIZES, "proportional", 50, seed=1, epoch=0)
    assert first == task_schedule(SIZES, "proportional", 50, seed=1, epoch=0)
    assert first != task_schedule(SIZES, "proportional", 50, seed=2, epoch=0)
    assert first != task_schedule(SIZES, "proportional", 50, seed=1, epoch=1)


def _task_of(index: int, sizes: list[int]) -> int:
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return max(i for i, offset in enumerate(offsets) if offset <= index)


@pytest.mark.parametrize("strategy", ["proportional", "temperature", "round_robin"])
def test_every_process_draws_the_same_task_and_two_processes_see_one_process_rows(strategy):
    sizes = [30, 50, 70]
    one = list(TaskBatchSampler(sizes, per_device_batch_size=8, num_processes=1, strategy=strategy, seed=5))
    two = list(TaskBatchSampler(sizes, per_device_batch_size=4, num_processes=2, strategy=strategy, seed=5))
    assert len(two) == 2 * len(one)
    for step, batch in enumerate(one):
        rank0, rank1 = two[2 * step], two[2 * step + 1]  # BatchSamplerShard: batch k goes to process k mod 2
        tasks = {_task_of(i, sizes) for i in batch + rank0 + rank1}
        assert len(tasks) == 1, f"step {step} mixes tasks {tasks}"
        assert rank0 + rank1 == batch


def test_rows_of_a_task_are_all_used_before_any_repeats():
    sizes = [12, 40]
    sampler = TaskBatchSampler(sizes, per_device_batch_size=4, strategy="round_robin", seed=0, steps_per_epoch=6)
    first_task_rows = [i for batch in sampler for i in batch if i < 12]
    assert sorted(first_task_rows) == list(range(12))  # 3 steps x 4 rows = one full pass, no duplicates


@pytest.mark.parametrize("strategy", ["proportional", "all"])
def test_accelerate_shards_hand_each_process_its_batch_of_every_step(strategy):
    """What Accelerate's `BatchSamplerShard` (DDP) makes of the sampler: every process gets every step, in turn."""
    from accelerate.data_loader import BatchSamplerShard

    sizes = [10, 20]
    sampler = TaskBatchSampler(sizes, per_device_batch_size=3, num_processes=2, strategy=strategy, seed=0)
    everything = list(sampler)
    for rank in (0, 1):
        shard = list(BatchSamplerShard(sampler, num_processes=2, process_index=rank))
        assert shard == everything[rank::2]
    if strategy == "all":
        for batch in everything:
            assert [_task_of(i, sizes) for i in batch] == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="sampling_temperature"):
        task_probabilities(SIZES, "temperature", temperature)


# ---------------------------------------------------------------------------------------------------------------
# weighting


def test_static_weighting_equals_a_hand_weighted_sum_in_float64():
    torch.manual_seed(0)
    losses = [torch.rand((), dtype=torch.float32) * 10 for _ in range(4)]
    weights = [0.25, 1.0, 0.0, 3.5]
    reference = sum(w * loss.double().item() for w, loss in zip(weights, losses, strict=True))
    assert static_weighted_sum(losses, weights).item() == pytest.approx(reference, rel=1e-6)
    exact = static_weighted_sum([loss.double() for loss in losses], weights).item()
    assert exact == pytest.approx(reference, rel=1e-15)
    # a task weighted 0 contributes nothing, not even a NaN
    assert torch.isfinite(static_weighted_sum([losses[0], torch.tensor(float("nan"))], [1.0, 0.0]))


def test_static_weighting_gradients_are_the_weights():
    losses = [torch.tensor(2.0, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    static_weighted_sum(losses, [0.5, 2.0, 0.0]).backward()
    assert [loss.grad.item() if loss.grad is not None else 0.0 for loss in losses] == [0.5, 2.0, 0.0]


def test_uncertainty_weighting_formula():
    losses = [torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)]
    log_variances = torch.tensor([0.3, -1.2], dtype=torch.float64)
    expected = math.exp(-0.3) * 2.0 + 0.3 + math.exp(1.2) * 0.5 - 1.2
    assert uncertainty_weighted_sum(losses, log_variances).item() == pytest.approx(expected, rel=1e-14)
    assert effective_weights("uncertainty", [1.0, 2.0], log_variances) == pytest.approx(
        [math.exp(-0.3), 2 * math.exp(1.2)]
    )


def test_uncertainty_weighting_recovers_the_noise_ratio_of_a_two_task_regression():
    """Two linear regressions with noise standard deviations 0.5 and 1.5 (variance ratio 9): trained jointly under
    Kendall's objective, exp(s_2 - s_1) must come out at 9 within 10%."""
    generator = torch.Generator().manual_seed(0)
    num_rows, width, noise = 4000, 4, (0.5, 1.5)
    inputs = torch.randn(num_rows, width, generator=generator, dtype=torch.float64)
    targets = [
        inputs @ torch.randn(width, generator=generator, dtype=torch.float64)
        + sigma * torch.randn(num_rows, generator=generator, dtype=torch.float64)
        for sigma in noise
    ]
    coefficients = [torch.zeros(width, dtype=torch.float64, requires_grad=True) for _ in noise]
    log_variances = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([*coefficients, log_variances], lr=0.05)
    for _ in range(1500):
        optimizer.zero_grad()
        losses = [((inputs @ c - y) ** 2).mean() for c, y in zip(coefficients, targets, strict=True)]
        uncertainty_weighted_sum(losses, log_variances).backward()
        optimizer.step()
    log_variances = log_variances.detach()
    recovered = math.exp(float(log_variances[1] - log_variances[0]))
    true_ratio = (noise[1] / noise[0]) ** 2
    assert abs(recovered / true_ratio - 1) < 0.10, recovered
    # and each learned variance is its task's noise variance
    assert math.exp(float(log_variances[0])) == pytest.approx(noise[0] ** 2, rel=0.1)


def test_pcgrad_matches_its_closed_form_on_a_two_parameter_example():
    """Two losses of a two-parameter model whose gradients conflict; the closed form of PCGrad for two tasks is
    g1 - (g1.g2)/|g2|^2 g2 + g2 - (g2.g1)/|g1|^2 g1."""
    theta = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    loss_1 = (theta[0] - 2.0) ** 2 + 0.5 * theta[1] ** 2
    loss_2 = (theta[0] + 1.0) ** 2 + (theta[1] - 1.5) ** 2
    g1 = torch.autograd.grad(loss_1, theta, retain_graph=True)[0]
    g2 = torch.autograd.grad(loss_2, theta)[0]
    dot = float(g1 @ g2)
    assert dot < 0, "the example must have conflicting gradients"
    n1, n2 = float(g1 @ g1), float(g2 @ g2)
    closed_form = [g1[k].item() - dot / n2 * g2[k].item() + g2[k].item() - dot / n1 * g1[k].item() for k in range(2)]
    combined = pcgrad_combine([g1, g2])
    assert combined.tolist() == pytest.approx(closed_form, rel=1e-12)
    # the projected gradients no longer conflict with the other task
    projected_1 = g1 - dot / n2 * g2
    assert float(projected_1 @ g2) == pytest.approx(0.0, abs=1e-12)
    # order of the two tasks does not matter, and without a conflict PCGrad is the plain sum
    assert pcgrad_combine([g2, g1]).tolist() == pytest.approx(closed_form, rel=1e-12)
    agreeing = g1 + 0.1 * torch.tensor([-g1[1], g1[0]], dtype=torch.float64)  # positive dot product with g1
    assert pcgrad_combine([g1, agreeing]).tolist() == pytest.approx((g1 + agreeing).tolist(), rel=1e-14)


def test_bad_weights_are_refused_naming_the_task():
    with pytest.raises(ValueError, match=r"task\(s\) \['jargon'\].*not among the training tasks"):
        check_task_weights({"jargon": 1.0}, ["python_docs", "domain"], "task_weights")
    with pytest.raises(ValueError, match=r"task_weights\['domain'\]=-0.5 must be a finite number >= 0"):
        check_task_weights({"domain": -0.5}, ["python_docs", "domain"], "task_weights")
    with pytest.raises(ValueError, match=r"task_weights\['domain'\]=nan"):
        check_task_weights({"domain": float("nan")}, ["python_docs", "domain"], "task_weights")
    with pytest.raises(ValueError, match="one weight per loss"):
        static_weighted_sum([torch.tensor(1.0)], [1.0, 2.0])
