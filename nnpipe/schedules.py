"""Learning-rate schedules by name.

Each schedule is a function ``(optimizer, ctx, **params) -> (torch scheduler, step_every)`` where
``ctx`` tells the total number of epochs and the number of optimizer steps per epoch. ``t`` below
counts optimizer steps (batches) for the schedules stepped per batch and epochs for the others;
``lr0`` is the estimator's ``lr``.

=================== ========== ==============================================================
name                steps per  learning rate
=================== ========== ==============================================================
``power``           batch      ``lr0 / (1 + t / decay_steps) ** power``
``exponential``     batch      ``lr0 * decay_rate ** (t / decay_steps)``
``piecewise``       epoch      ``lr0 * values[i]`` for ``boundaries[i-1] <= epoch < boundaries[i]``
``plateau``         epoch      ``lr *= factor`` after ``patience`` epochs without improvement of
                               ``monitor`` (performance scheduling)
``onecycle``        batch      1cycle (Smith 2018): up to ``max_lr`` then annealed far below
``cosine``          batch      ``eta_min + (lr0 - eta_min) * (1 + cos(pi t / T)) / 2`` over the run
``cosine_restarts`` batch      cosine within cycles of ``cycle_epochs * mult**k`` epochs (SGDR)
=================== ========== ==============================================================

Defaults (any can be overridden with ``lr_schedule__<param>``): ``power``: ``decay_steps`` = steps
per epoch, ``power=1``; ``exponential``: ``decay_rate=0.1``, ``decay_steps`` = all steps of the run
(the rate falls ten-fold over the run); ``piecewise``: ``boundaries`` at 50% and 75% of the epochs,
``values=[1, 0.1, 0.01]``; ``plateau``: ``factor=0.5``, ``patience=5``, ``monitor="valid_loss"``;
``onecycle``: ``max_lr=lr0``; ``cosine``: ``eta_min=0``; ``cosine_restarts``: ``cycle_epochs=10``,
``mult=1``, ``eta_min=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

from torch.optim import lr_scheduler as torch_sched

from ._registry import Registry, invalid_value

__all__ = ["SCHEDULES", "ScheduleContext", "make_schedule"]


@dataclass(frozen=True)
class ScheduleContext:
    """What a schedule needs to know about the run it paces.

    ``steps_per_epoch`` is the number of training batches (optimizer steps) one epoch really
    runs -- the length of the training iterator -- or None when that iterator has no length;
    a schedule stepped per batch then cannot be paced and :meth:`batches` says so.
    """

    max_epochs: int
    steps_per_epoch: Optional[int]

    def batches(self) -> int:
        """``steps_per_epoch``, at least 1; a ``ValueError`` when it is unknown (None)."""
        if self.steps_per_epoch is None:
            raise ValueError("this lr_schedule steps once per batch and needs the number of "
                             "training batches per epoch, but the training iterator has no "
                             "len() (an iterable dataset?); use a schedule stepped per epoch "
                             "('piecewise', 'plateau') or an iterator with a length.")
        return max(1, int(self.steps_per_epoch))

    @property
    def total_steps(self) -> int:
        """Optimizer steps over the whole run: ``max_epochs`` x batches per epoch."""
        return max(1, self.max_epochs * self.batches())


SCHEDULES = Registry("lr_schedule", "a torch.optim.lr_scheduler class")


def _schedule(name: str):
    def deco(fn: Callable) -> Callable:
        SCHEDULES.register(name, fn)
        return fn
    return deco


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise invalid_value(f"lr_schedule__{name}", value, "a number > 0")


@_schedule("power")
def power(optimizer, ctx: ScheduleContext, decay_steps=None, power=1.0):
    decay_steps = ctx.batches() if decay_steps is None else decay_steps
    _positive("decay_steps", decay_steps)
    return torch_sched.LambdaLR(optimizer, lambda t: (1 + t / decay_steps) ** -power), "batch"


@_schedule("exponential")
def exponential(optimizer, ctx: ScheduleContext, decay_rate=0.1, decay_steps=None):
    decay_steps = ctx.total_steps if decay_steps is None else decay_steps
    _positive("decay_steps", decay_steps)
    _positive("decay_rate", decay_rate)
    return torch_sched.LambdaLR(optimizer, lambda t: decay_rate ** (t / decay_steps)), "batch"


@_schedule("piecewise")
def piecewise(optimizer, ctx: ScheduleContext, boundaries=None, values=None):
    if boundaries is None:
        boundaries = [max(1, ctx.max_epochs // 2), max(1, (3 * ctx.max_epochs) // 4)]
    values = [1.0, 0.1, 0.01][: len(boundaries) + 1] if values is None else list(values)
    boundaries = list(boundaries)
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"lr_schedule__values needs one more entry than lr_schedule__boundaries "
                         f"(got {len(values)} values for {len(boundaries)} boundaries).")
    if boundaries != sorted(boundaries):
        raise invalid_value("lr_schedule__boundaries", boundaries, "increasing epoch numbers")

    def factor(epoch: int) -> float:
        return values[sum(epoch >= b for b in boundaries)]

    return torch_sched.LambdaLR(optimizer, factor), "epoch"


@_schedule("plateau")
def plateau(optimizer, ctx: ScheduleContext, factor=0.5, patience=5, monitor="valid_loss",
            mode="min", min_lr=0.0, threshold=1e-4):
    if not 0 < factor < 1:
        raise invalid_value("lr_schedule__factor", factor, "a float in (0, 1)")
    sched = torch_sched.ReduceLROnPlateau(optimizer, mode=mode, factor=factor, patience=patience,
                                          min_lr=min_lr, threshold=threshold)
    sched.monitor = monitor
    return sched, "epoch"


@_schedule("onecycle")
def onecycle(optimizer, ctx: ScheduleContext, max_lr=None, pct_start=0.3, div_factor=25.0,
             final_div_factor=1e4):
    if max_lr is not None:
        _positive("max_lr", max_lr)
    # one peak per param group, so per-group lr_multipliers keep their ratios
    peaks = [g["lr"] if max_lr is None else max_lr * g.get("lr_multiplier", 1.0)
             for g in optimizer.param_groups]
    return torch_sched.OneCycleLR(optimizer, max_lr=peaks, total_steps=ctx.total_steps,
                                  pct_start=pct_start, div_factor=div_factor,
                                  final_div_factor=final_div_factor), "batch"


@_schedule("cosine")
def cosine(optimizer, ctx: ScheduleContext, eta_min=0.0):
    return torch_sched.CosineAnnealingLR(optimizer, T_max=ctx.total_steps, eta_min=eta_min), "batch"


@_schedule("cosine_restarts")
def cosine_restarts(optimizer, ctx: ScheduleContext, cycle_epochs=10, mult=1, eta_min=0.0):
    _positive("cycle_epochs", cycle_epochs)
    if not isinstance(mult, int) or mult < 1:
        raise invalid_value("lr_schedule__mult", mult, "an int >= 1")
    t0 = max(1, int(round(cycle_epochs * ctx.batches())))
    return torch_sched.CosineAnnealingWarmRestarts(optimizer, T_0=t0, T_mult=mult,
                                                   eta_min=eta_min), "batch"


def _is_scheduler_class(obj: Any) -> bool:
    return isinstance(obj, type) and (issubclass(obj, torch_sched.LRScheduler)
                                      or issubclass(obj, torch_sched.ReduceLROnPlateau))


def make_schedule(schedule: Any, optimizer, ctx: ScheduleContext, **params) -> Tuple[Any, str]:
    """Build ``(scheduler, step_every)`` for a schedule name or a torch scheduler class.

    A torch class is built as ``cls(optimizer, **params)`` and stepped per epoch unless
    ``step_every="batch"`` is given.

    Examples
    --------
    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    >>> sched, every = make_schedule("power", opt, ScheduleContext(10, 5), decay_steps=5)
    >>> every, [round(g["lr"], 4) for g in opt.param_groups]
    ('batch', [0.1])
    """
    if _is_scheduler_class(schedule):
        step_every = params.pop("step_every", "epoch")
        if step_every not in ("epoch", "batch"):
            raise invalid_value("lr_schedule__step_every", step_every, "'epoch' or 'batch'")
        monitor = params.pop("monitor", "valid_loss")
        sched = schedule(optimizer, **params)
        sched.monitor = monitor
        return sched, step_every
    builder = SCHEDULES.get(schedule, accept=_is_scheduler_class)
    try:
        return builder(optimizer, ctx, **params)
    except TypeError as exc:
        raise ValueError(f"lr_schedule={schedule!r} got unexpected lr_schedule__* arguments "
                         f"{sorted(params)}: {exc}") from None
