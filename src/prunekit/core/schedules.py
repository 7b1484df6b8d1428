"""Sparsity schedules: the target sparsity as a pure function of training progress p ∈ [0, 1].

A :class:`Schedule` is a *shape* (a function ``q ↦ f(q)``, the fraction of the way from the
initial sparsity ``s_i`` to the final one ``s_f``, with f(1) = 1) placed in a *pruning window*
``[start, end]`` given as fractions of the whole training budget (METHODS.md §3.2)::

    s(p) = s_i                                  p <  start        (before the window)
    s(p) = s_i + (s_f − s_i) · f(q)             start ≤ p < end,  q = (p − start)/(end − start)
    s(p) = s_f  (exactly, the float you passed) p ≥  end          (hence s(1) = s_f for every shape)

**What p means.** p is the fraction of the budget's iterations that are *complete*: p = k/T
after k of T iterations, so s(p) is the sparsity the model should hold once the k-th iteration
has run. :class:`SparsityScheduler` follows this convention: after ``k`` calls to ``step()``
its ``sparsity`` is s(k/T). A gradual-pruning hook calls ``step()`` before each training
iteration and prunes to ``sparsity`` before the forward pass, so iteration i (0-based) trains at
s((i+1)/T), the model holds exactly s(e/E) at the end of epoch e of E — whatever the number of
steps per epoch — and exactly s_f after the last iteration. This is the convention that
reproduces the companion blog's 10-epoch sparsity sequences (METHODS.md §3.2) to the printed
two decimals; fasterai's own ``pos = iteration/total`` evaluated before the batch (0-based) would
put s((eN − 1)/(EN)) in the model at the end of epoch e, which does not reproduce them.

**The window's first iteration.** At p = start exactly (q = 0) no iteration of the window has
run yet. The step shapes are left-continuous, i.e. they use ⌈·⌉: ``one_shot`` is s_i at q = 0
and s_f for every q > 0; ``iterative(n)`` is s_i + (s_f − s_i)/n · ⌈n·q⌉. So the *first
iteration inside the window* (the one that completes at p = start + 1/T) jumps straight to s_f
(one-shot) or to s_i + (s_f − s_i)/n (iterative, "immediately when the window opens"), and a
one-shot window opening at 40% of the budget trains dense for exactly 40% of the iterations.
``agp``, ``linear`` and ``cosine`` are continuous with f(0) = 0. ``one_cycle`` is the only
shape with f(0) ≠ 0: s(start) = s_i + 0.00669·(s_f − s_i) for α = 14, β = 5 (METHODS: "s(0) =
0.00669·s_f, not exactly zero"); with start > 0 that is a small jump when the window opens.

**Window rules.** 0 ≤ start < end ≤ 1 for every shape. A zero-width window is refused even for
``one_shot``: its ``end`` has no effect (s_f from the first iteration after ``start`` on), so a
one-shot schedule only needs ``start``. Sparsities are fractions in [0, 1] with initial ≤ final;
a percent-style value such as 90 is refused with a hint to write 0.9.

Shapes are registered in :data:`SCHEDULES` (one function each) and built by
:func:`build_schedule`; a user-defined callable ``q ↦ fraction of the way`` is accepted wherever
a name is.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from prunekit.errors import UserError
from prunekit.registry import Registry

log = logging.getLogger(__name__)

Shape = Callable[[float], float]
"""``q ↦ f(q)``: fraction of the way from s_i to s_f at window progress q ∈ [0, 1]; f(1) = 1."""

SCHEDULES: Registry[Callable[..., Shape]] = Registry("sparsity schedule")

# Slack for float noise in the step shapes: n·q computed as 1.0000000000000002 at a step boundary
# must not jump one iteration early.
_STEP_EPS = 1e-9


# --------------------------------------------------------------------------------- shapes
@SCHEDULES.register("one_shot")
def one_shot() -> Shape:
    """s_f for every q > 0: one jump at the window's first iteration (s_i at q = 0)."""

    def f(q: float) -> float:
        return 1.0 if q > 0 else 0.0

    return f


@SCHEDULES.register("iterative")
def iterative(n: int = 3) -> Shape:
    """n equal jumps: f(q) = ⌈n·q⌉ / n (the first one at the window's first iteration)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise UserError(f"n: expected the number of pruning steps as an integer >= 1, got {n!r}")

    n = int(n)

    def f(q: float) -> float:
        return max(0, math.ceil(n * q - _STEP_EPS)) / n

    return f


@SCHEDULES.register("agp")
def agp() -> Shape:
    """Automated Gradual Pruning (Zhu & Gupta 2017), cubic: s = s_f + (s_i − s_f)(1 − q)³.

    Written as f(q) = 1 − (1 − q)³ so it is correct for any s_i (not fasterai's pre-Oct-2021
    ``end + start − end·(1 − pos)³``, which is right only for s_i = 0).
    """

    def f(q: float) -> float:
        return 1.0 - (1.0 - q) ** 3

    return f


@SCHEDULES.register("one_cycle")
def one_cycle(alpha: float = 14.0, beta: float = 5.0) -> Shape:
    """One-Cycle Pruning: f(q) = (1 + e^{−α+β}) / (1 + e^{−αq+β}).

    Defaults α = 14, β = 5 are the paper's (midpoint q = β/α ≈ 0.357), not fasterai's β = 6.
    """
    alpha, beta = _number("alpha", alpha), _number("beta", beta)
    if not 0 < alpha <= 200:
        raise UserError(f"alpha: expected a slope in (0, 200] (the paper uses 14), got {alpha!r}")
    if not -200 <= beta <= 200:
        raise UserError(f"beta: expected an offset in [-200, 200] (the paper uses 5), got {beta!r}")
    top = 1.0 + math.exp(-alpha + beta)

    def f(q: float) -> float:
        return top / (1.0 + math.exp(-alpha * q + beta))

    return f


@SCHEDULES.register("linear")
def linear() -> Shape:
    """f(q) = q."""

    def f(q: float) -> float:
        return q

    return f


@SCHEDULES.register("cosine")
def cosine() -> Shape:
    """f(q) = (1 + cos(π(1 − q))) / 2, i.e. s = s_i + (1 + cos(π(1 − q)))(s_f − s_i)/2."""

    def f(q: float) -> float:
        return (1.0 + math.cos(math.pi * (1.0 - q))) / 2.0

    return f


# ------------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class Schedule:
    """Sparsity s(p) at training progress p ∈ [0, 1]; see the module docstring for the rules.

    Build it with :func:`build_schedule`, which validates every field.
    """

    name: str
    shape: Shape = field(repr=False, compare=False)
    final: float
    initial: float = 0.0
    start: float = 0.0
    end: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    custom: bool = False

    def __call__(self, p: float) -> float:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected training progress in [0, 1], got {p!r}")
        if p >= self.end:
            return self.final
        if p < self.start:
            return self.initial
        q = (p - self.start) / (self.end - self.start)
        fraction = self.shape(q)
        if self.custom:
            fraction = _check_fraction(self.name, q, fraction)
        return self.initial + (self.final - self.initial) * fraction

    def window_progress(self, p: float) -> float | None:
        """q = (p − start)/(end − start) inside the window [start, end], None outside it."""
        if not self.start <= p <= self.end:
            return None
        return (p - self.start) / (self.end - self.start)

    def describe(self) -> str:
        """One line for titles and logs, e.g. ``one_cycle(alpha=14, beta=5): 0 → 0.9, window [0, 1]``."""
        args = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        shape = f"{self.name}({args})" if args else self.name
        return (f"{shape}: {_fmt(self.initial)} → {_fmt(self.final)}, "
                f"window [{_fmt(self.start)}, {_fmt(self.end)}]")

    def to_dict(self) -> dict[str, Any]:
        """Everything :func:`build_schedule` needs to rebuild it (built-in shapes only)."""
        return {"name": self.name, "final": self.final, "initial": self.initial, "start": self.start,
                "end": self.end, **dict(self.params)}

    def curve(self, points: int) -> list[tuple[float, float]]:
        """``points`` evenly spaced (p, s(p)) pairs from p = 0 to p = 1 inclusive."""
        if points < 2:
            raise UserError(f"points: expected an integer >= 2, got {points!r}")
        return [(i / (points - 1), self(i / (points - 1))) for i in range(points)]


def build_schedule(name: str | Shape, final: float, initial: float = 0.0, start: float = 0.0,
                   end: float = 1.0, **shape_args: Any) -> Schedule:
    """A validated :class:`Schedule`.

    ``name`` is a registered shape (``SCHEDULES.names()``) or a callable ``q ↦ fraction of the
    way`` (f(0) ≥ 0, f(1) = 1, values in [0, 1]); ``shape_args`` go to the shape (``n`` for
    ``iterative``, ``alpha``/``beta`` for ``one_cycle``).
    """
    final = _sparsity("final", final)
    initial = _sparsity("initial", initial)
    if initial > final:
        raise UserError(f"initial: expected a sparsity <= final ({final!r}), got {initial!r}; "
                        "schedules only increase sparsity")
    start = _fraction("start", start)
    end = _fraction("end", end)
    if not start < end:
        raise UserError(f"start: expected start < end (the pruning window as fractions of the budget), "
                        f"got start={start!r}, end={end!r}")
    if callable(name):
        if shape_args:
            raise UserError(f"shape_args: a user-defined schedule takes none, got {', '.join(sorted(shape_args))}")
        label = getattr(name, "__name__", type(name).__name__)
        label = "custom" if label == "<lambda>" else label
        for q in (0.0, 0.5, 1.0):
            fraction = _check_fraction(label, q, name(q))
        if abs(fraction - 1.0) > 1e-6:
            raise UserError(f"schedule {label!r}: a shape must reach 1 (all of the way) at q = 1, got {fraction!r}")
        return Schedule(label, name, final, initial, start, end, {}, custom=True)
    if not isinstance(name, str):
        raise UserError(f"schedule: expected a name ({', '.join(SCHEDULES.names())}) or a callable, got {name!r}")
    factory = SCHEDULES.get(name)
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(shape_args) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) or "no parameters"
        raise UserError(f"schedule_args: {name!r} does not take {', '.join(unknown)} (it takes {takes})")
    params = {k: p.default for k, p in accepted.items()}
    params.update(shape_args)
    return Schedule(name, factory(**shape_args), final, initial, start, end, params)


# -------------------------------------------------------------------- LR-scheduler shape
class SparsityScheduler:
    """A schedule driven by an iteration counter, shaped like a torch LR scheduler.

    After ``k`` calls to :meth:`step` the progress is p = k / total_steps (clamped to 1) and
    :attr:`sparsity` is ``schedule(p)``: s(0) before the first call, s_f exactly after the
    ``total_steps``-th. Call ``step()`` once per training iteration, before that iteration's
    forward pass, then prune to ``sparsity`` (see the module docstring for why).
    """

    def __init__(self, schedule: Schedule, total_steps: int) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise UserError(f"total_steps: expected an integer >= 1, got {total_steps!r}")
        self.schedule = schedule
        self.total_steps = total_steps
        self.last_step = 0

    @property
    def progress(self) -> float:
        return min(1.0, self.last_step / self.total_steps)

    @property
    def sparsity(self) -> float:
        """Target sparsity after ``last_step`` completed iterations."""
        return self.schedule(self.progress)

    def sparsity_at(self, step: int) -> float:
        """Target sparsity after ``step`` completed iterations (a pure look-up; the counter is untouched)."""
        if step < 0:
            raise ValueError(f"step: expected an integer >= 0, got {step!r}")
        return self.schedule(min(1.0, step / self.total_steps))

    def step(self) -> float:
        """Count one more iteration; returns the new :attr:`sparsity`."""
        self.last_step += 1
        if self.last_step == self.total_steps + 1:
            log.warning("sparsity scheduler stepped past total_steps=%d; holding s_f", self.total_steps)
        return self.sparsity

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "total_steps": self.total_steps,
                "schedule": None if self.schedule.custom else self.schedule.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["total_steps"] != self.total_steps:
            raise UserError(f"total_steps: the saved sparsity scheduler ran over {state['total_steps']} steps, "
                            f"this one over {self.total_steps}; resume with the same budget")
        saved = state.get("schedule")
        if saved is not None and not self.schedule.custom and saved != self.schedule.to_dict():
            log.warning("resuming sparsity scheduler saved with %s under %s", saved, self.schedule.to_dict())
        self.last_step = int(state["last_step"])

    def __repr__(self) -> str:
        return (f"SparsityScheduler({self.schedule.describe()}, step {self.last_step}/{self.total_steps}, "
                f"sparsity {self.sparsity:.4f})")


# ------------------------------------------------------------------------------- helpers
def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _fraction(name: str, value: Any) -> float:
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{name}: expected a fraction of the training budget in [0, 1], got {value!r}")
    return value


def _sparsity(name: str, value: Any) -> float:
    value = _number(name, value)
    if 1.0 < value <= 100.0:
        raise UserError(f"{name}: expected a sparsity fraction in [0, 1], got {value!r}; "
                        f"write {_fmt(value / 100)} for {_fmt(value)}%")
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{name}: expected a sparsity fraction in [0, 1], got {value!r}")
    return value


def _check_fraction(label: str, q: float, fraction: Any) -> float:
    try:
        fraction = float(fraction)
    except (TypeError, ValueError):
        raise UserError(f"schedule {label!r}: expected a number at q={q!r}, got {fraction!r}") from None
    if not -1e-9 <= fraction <= 1.0 + 1e-9:
        raise UserError(f"schedule {label!r}: expected a fraction of the way in [0, 1] at q={q!r}, got {fraction!r}")
    return min(1.0, max(0.0, fraction))


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
