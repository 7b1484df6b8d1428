"""Sparsity schedules: METHODS.md §3.2 reference values, window semantics, s(1) = s_f, scheduler state."""

from __future__ import annotations

import math

import pytest

from prunekit.core.schedules import SCHEDULES, SparsityScheduler, build_schedule
from prunekit.errors import UserError

ALL = ["one_shot", "iterative", "agp", "one_cycle", "linear", "cosine"]

# METHODS §3.2, s_i = 0, s_f = 1, beta = 5. The document prints 0.1825 at p = 0.25; the formula
# gives 0.182448 (0.1824 to four places), hence a tolerance of 1e-4 rather than half an ulp.
OCP_BETA5 = {0.1: 0.0266, 0.2: 0.0998, 0.25: 0.1825, 0.3: 0.3101, 0.4: 0.6457, 0.5: 0.8809,
             0.6: 0.9678, 0.75: 0.9961, 0.9: 0.9996}
OCP_BETA6 = {0.2: 0.0392, 0.5: 0.7313}

# The companion blog (ResNet-18, 10 epochs, 95%): sparsity in % at the end of epochs 1..10.
BLOG_OCP = [2.53, 9.48, 29.46, 61.34, 83.69, 91.94, 94.24, 94.82, 94.96, 95.00]
BLOG_AGP_FROM_EPOCH_2 = [0, 0, 31.36, 54.92, 71.81, 83.12, 89.99, 93.52, 94.81, 95.00]


def test_registry_holds_every_shape():
    assert SCHEDULES.names() == sorted(ALL)


# ------------------------------------------------------------------ reference values
@pytest.mark.parametrize("p, expected", OCP_BETA5.items())
def test_one_cycle_reference_values_beta_5(p, expected):
    assert build_schedule("one_cycle", 1.0)(p) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("p, expected", OCP_BETA6.items())
def test_one_cycle_reference_values_beta_6(p, expected):
    assert build_schedule("one_cycle", 1.0, beta=6)(p) == pytest.approx(expected, abs=5e-5)


def test_one_cycle_defaults_are_the_papers_not_fasterais():
    schedule = build_schedule("one_cycle", 0.9)
    assert schedule.params == {"alpha": 14.0, "beta": 5.0}
    assert schedule(0.5) == build_schedule("one_cycle", 0.9, alpha=14, beta=5)(0.5)


@pytest.mark.parametrize("final", [0.9, 0.95, 1.0])
def test_one_cycle_starts_slightly_above_zero(final):
    assert build_schedule("one_cycle", final)(0.0) == pytest.approx(0.00669 * final, rel=1e-3)


@pytest.mark.parametrize("p, expected", [(0.25, 0.578), (0.5, 0.875), (0.75, 0.984)])
def test_agp_reference_values(p, expected):
    assert build_schedule("agp", 0.9)(p) == pytest.approx(expected * 0.9, abs=5e-4 * 0.9)


def test_agp_is_correct_with_a_nonzero_initial_sparsity():
    s_i, s_f = 0.5, 0.9
    schedule = build_schedule("agp", s_f, initial=s_i)
    for p in (0.0, 0.25, 0.5, 0.75):
        assert schedule(p) == pytest.approx(s_f + (s_i - s_f) * (1 - p) ** 3, abs=1e-12)
    assert schedule(0.5) == pytest.approx(0.85)
    # fasterai's pre-Oct-2021 typo, end + start - end*(1-pos)^3, would give 1.2875 here
    assert schedule(0.5) != pytest.approx(s_f + s_i - s_f * 0.5**3)


def test_cosine_and_linear_formulas():
    cosine = build_schedule("cosine", 0.8, initial=0.2)
    linear = build_schedule("linear", 0.8, initial=0.2)
    for p in (0.1, 0.3, 0.5, 0.9):
        assert cosine(p) == pytest.approx(0.2 + (1 + math.cos(math.pi * (1 - p))) * 0.6 / 2)
        assert linear(p) == pytest.approx(0.2 + 0.6 * p)


# ---------------------------------------------------------------- the 10-epoch blog check
def end_of_epoch_sparsities(schedule, epochs: int, steps_per_epoch: int) -> list[float]:
    """Drive the scheduler as a hook would (step() before each iteration) and read it per epoch."""
    scheduler = SparsityScheduler(schedule, epochs * steps_per_epoch)
    values = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            scheduler.step()
        values.append(100 * scheduler.sparsity)
    return values


def same_to_two_decimals(values: list[float], printed: list[float]) -> bool:
    # AGP at epoch 6 is exactly 83.125% (a rounding tie printed as 83.12), so compare as
    # "rounds to the printed value", with ties either way.
    return all(abs(v - r) <= 0.005 + 1e-9 for v, r in zip(values, printed, strict=True))


@pytest.mark.parametrize("steps_per_epoch", [1, 7, 148])
def test_blog_sequences_reproduce_with_p_equal_completed_over_total(steps_per_epoch):
    ocp = end_of_epoch_sparsities(build_schedule("one_cycle", 0.95), 10, steps_per_epoch)
    agp = end_of_epoch_sparsities(build_schedule("agp", 0.95, start=0.2), 10, steps_per_epoch)
    assert same_to_two_decimals(ocp, BLOG_OCP), ocp
    assert same_to_two_decimals(agp, BLOG_AGP_FROM_EPOCH_2), agp
    assert ocp[-1] == agp[-1] == 95.0


def test_blog_sequences_rule_out_the_last_batch_convention():
    """p = (e·N − 1)/(E·N) at the end of epoch e (fasterai's 0-based pos before the batch) misses."""
    schedule = build_schedule("one_cycle", 0.95)
    n = 148
    values = [100 * schedule((e * n - 1) / (10 * n)) for e in range(1, 11)]
    assert not same_to_two_decimals(values, BLOG_OCP)


# ----------------------------------------------------------------------- window semantics
def test_before_at_inside_and_after_the_window():
    schedule = build_schedule("linear", 0.9, initial=0.1, start=0.2, end=0.6)
    assert schedule(0.0) == schedule(0.19) == 0.1            # before: s_i exactly
    assert schedule(0.2) == 0.1                                # at start: q = 0
    assert schedule(0.4) == pytest.approx(0.5)                 # inside: q = 0.5
    assert schedule(0.6) == schedule(0.8) == schedule(1.0) == 0.9   # at/after end: s_f exactly
    assert schedule.window_progress(0.4) == pytest.approx(0.5)
    assert schedule.window_progress(0.1) is None and schedule.window_progress(0.7) is None


def test_one_shot_jumps_at_the_first_iteration_after_start():
    schedule = build_schedule("one_shot", 0.9, start=0.4)
    assert schedule(0.4) == 0.0                # dense for exactly 40% of the budget
    assert schedule(0.4 + 1e-6) == 0.9         # the window's first iteration prunes everything
    assert schedule(0.7) == schedule(1.0) == 0.9
    scheduler = SparsityScheduler(schedule, 100)
    values = [scheduler.step() for _ in range(100)]    # values[i] = sparsity iteration i trains at
    assert values[:40] == [0.0] * 40 and values[40:] == [0.9] * 60


def test_iterative_jumps_immediately_then_at_each_third():
    schedule = build_schedule("iterative", 0.9, start=0.2, n=3)
    third = 0.8 / 3
    assert schedule(0.2) == 0.0
    assert schedule(0.2 + 1e-6) == pytest.approx(0.3)            # immediately when the window opens
    assert schedule(0.2 + third) == pytest.approx(0.3)           # still 1/3 exactly at the boundary
    assert schedule(0.2 + third + 1e-6) == pytest.approx(0.6)    # just above 1/3
    assert schedule(0.2 + 2 * third) == pytest.approx(0.6)
    assert schedule(0.2 + 2 * third + 1e-6) == pytest.approx(0.9)
    # per iteration: 30 steps, window = iterations 6..29, 8 iterations per level
    scheduler = SparsityScheduler(schedule, 30)
    values = [round(scheduler.step(), 12) for _ in range(30)]
    assert values == [0.0] * 6 + [0.3] * 8 + [0.6] * 8 + [0.9] * 8


def test_iterative_with_one_step_is_one_shot():
    one = build_schedule("iterative", 0.8, start=0.3, n=1)
    shot = build_schedule("one_shot", 0.8, start=0.3)
    assert all(one(i / 50) == shot(i / 50) for i in range(51))


def test_agp_window_opens_at_initial_sparsity():
    schedule = build_schedule("agp", 0.9, start=0.2)
    assert schedule(0.1) == schedule(0.2) == 0.0
    assert 0 < schedule(0.2 + 1e-3) < 0.02


@pytest.mark.parametrize("name", ALL)
def test_schedules_are_monotone_and_bounded(name):
    schedule = build_schedule(name, 0.9, initial=0.1, start=0.1, end=0.9)
    values = [schedule(i / 200) for i in range(201)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(0.1 <= v <= 0.9 for v in values)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("final, initial, start, end", [
    (0.9, 0.0, 0.0, 1.0), (0.95, 0.0, 0.2, 1.0), (0.7, 0.1, 0.0, 1.0), (0.3, 0.1, 0.25, 0.75),
    (1.0, 0.0, 0.0, 1.0), (0.1, 0.1, 0.0, 1.0)])
def test_s_of_one_is_exactly_final(name, final, initial, start, end):
    schedule = build_schedule(name, final, initial=initial, start=start, end=end)
    assert schedule(1.0) == final
    assert schedule(end) == final
    scheduler = SparsityScheduler(schedule, 37)
    for _ in range(37):
        scheduler.step()
    assert scheduler.sparsity == final


def test_user_defined_shape():
    schedule = build_schedule(lambda q: q**2, 0.8, start=0.5)
    assert schedule.name == "custom" and schedule.custom
    assert schedule(0.25) == 0.0
    assert schedule(0.75) == pytest.approx(0.8 * 0.25)
    assert schedule(1.0) == 0.8


# --------------------------------------------------------------------------- scheduler
def test_scheduler_state_dict_round_trip():
    schedule = build_schedule("one_cycle", 0.9)
    a = SparsityScheduler(schedule, 50)
    for _ in range(17):
        a.step()
    state = a.state_dict()
    assert state["last_step"] == 17 and state["total_steps"] == 50
    b = SparsityScheduler(build_schedule("one_cycle", 0.9), 50)
    b.load_state_dict(state)
    assert b.last_step == 17 and b.sparsity == a.sparsity == schedule(17 / 50)
    assert [b.step() for _ in range(33)] == [a.step() for _ in range(33)]
    assert b.sparsity == 0.9


def test_scheduler_starts_at_s_of_zero_and_clamps_past_the_end():
    scheduler = SparsityScheduler(build_schedule("linear", 0.5), 4)
    assert scheduler.sparsity == 0.0 and scheduler.progress == 0.0
    assert [scheduler.step() for _ in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert scheduler.sparsity_at(2) == 0.25 and scheduler.last_step == 6


def test_scheduler_refuses_a_state_from_another_budget():
    saved = SparsityScheduler(build_schedule("agp", 0.9), 100).state_dict()
    with pytest.raises(UserError, match="total_steps"):
        SparsityScheduler(build_schedule("agp", 0.9), 200).load_state_dict(saved)


# -------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, message", [
    (dict(name="one_cycle", final=90), r"final: .* write 0\.9 for 90%"),
    (dict(name="agp", final=0.9, initial=50), r"initial: .* write 0\.5 for 50%"),
    (dict(name="agp", final=-0.1), "final: expected a sparsity fraction in"),
    (dict(name="agp", final=float("nan")), "final: expected a finite number"),
    (dict(name="agp", final=0.5, initial=0.6), "initial: expected a sparsity <= final"),
    (dict(name="agp", final=0.9, start=0.6, end=0.4), "start: expected start < end"),
    (dict(name="one_shot", final=0.9, start=0.4, end=0.4), "start: expected start < end"),
    (dict(name="agp", final=0.9, end=1.5), r"end: expected a fraction of the training budget in \[0, 1\]"),
    (dict(name="agp", final=0.9, start=-0.1), "start: expected a fraction"),
    (dict(name="agpp", final=0.9), "unknown sparsity schedule 'agpp'; known: agp, cosine, iterative"),
    (dict(name="agp", final=0.9, alpha=3), "'agp' does not take alpha"),
    (dict(name="iterative", final=0.9, n=0), "n: expected the number of pruning steps"),
    (dict(name="iterative", final=0.9, n=2.5), "n: expected the number of pruning steps"),
    (dict(name="one_cycle", final=0.9, alpha=-1), "alpha: expected a slope"),
    (dict(name=lambda q: 2 * q, final=0.9), "expected a fraction of the way in"),
    (dict(name=lambda q: q / 2, final=0.9), "must reach 1"),
])
def test_validation_errors_are_one_line_user_errors(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(UserError, match=message) as info:
        build_schedule(name, **kwargs)
    assert "\n" not in str(info.value)


def test_scheduler_and_progress_validation():
    schedule = build_schedule("agp", 0.9)
    with pytest.raises(UserError, match="total_steps"):
        SparsityScheduler(schedule, 0)
    with pytest.raises(ValueError, match="p: expected training progress"):
        schedule(1.5)
