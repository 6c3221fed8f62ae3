"""The smallest model within an accuracy budget: prune in steps, recover, check.

:func:`prune_within` cuts a model step by step to the MACs reductions in ``levels`` (each
of the original model), lets the caller recover every cut (its own fine-tuning) and
score it (its own validation top-1), and keeps the smallest model whose score stays
within ``max_drop`` of the unpruned model's. It stops at the first step beyond the
budget. ``bpl compress --max-drop`` is this loop with bpl's fine-tuning; a training loop
of one's own plugs in the same way. With ``max_drop=math.inf`` and :func:`step_levels` it
is iterative pruning to a fixed cut (``bpl compress --flops-reduction R --prune-steps N``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..deprecation import renamed_keywords
from ..errors import InvalidArgumentError, PruningError, arg
from .graph import Inputs, deploy_macs
from .hard import prune

__all__ = ["LEVELS", "BudgetResult", "BudgetStep", "prune_within", "step_levels"]

log = logging.getLogger(__name__)

#: MACs reductions (each of the original model) the steps cut to, in turn. Provisional:
#: chosen so that the recovery study's cuts (50%, 74%, 90%, 95%) are steps; not yet
#: measured against other ladders (benchmarks/convergence_study.py, issue 26).
LEVELS: tuple[float, ...] = (0.5, 0.74, 0.85, 0.9, 0.93, 0.95)


@renamed_keywords(steps="prune_steps")
def step_levels(flops_reduction: float, prune_steps: int) -> list[float]:
    """``prune_steps`` cuts to ``flops_reduction`` (the fraction of FLOPs to remove, counted as
    MACs) that each keep the same fraction of the MACs
    (``--prune-steps``; ``steps=`` is its deprecated name until bpl 0.3).

    >>> [round(v, 3) for v in step_levels(0.9, 2)]
    [0.684, 0.9]
    """
    if not 0.0 < flops_reduction < 1.0:
        raise InvalidArgumentError(
            f"{arg('flops_reduction')} must be between 0 and 1 (exclusive), got {flops_reduction}",
            param="flops_reduction")
    if isinstance(prune_steps, bool) or not isinstance(prune_steps, int) or prune_steps < 1:
        raise InvalidArgumentError(
            f"{arg('prune_steps')} must be a whole number of at least 1, got {prune_steps!r}",
            param="prune_steps")
    return [1 - (1 - flops_reduction) ** (k / prune_steps) for k in range(1, prune_steps + 1)]


@dataclass
class BudgetStep:
    """One cut: what it asked, what it reached, and how the recovered model scored."""

    step: int  # 1, 2, ...
    target: float  # MACs reduction asked (of the original model)
    macs_reduction: float  # reached
    score: float  # the caller's score of the recovered model (validation top-1)
    within: bool  # score >= reference - max_drop (always, with no budget: max_drop inf)


@dataclass
class BudgetResult:
    """What :func:`prune_within` found: every step, and the smallest model within budget."""

    reference: float  # the unpruned model's score
    max_drop: float
    steps: list[BudgetStep] = field(default_factory=list)
    model: nn.Module | None = None  # the last step within budget (None: not even the first)
    stopped: str = ""  # why the search ended

    @property
    def chosen(self) -> BudgetStep | None:
        """The step whose model is :attr:`model`."""
        within = [s for s in self.steps if s.within]
        return within[-1] if within else None

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen
        return {"reference": self.reference,
                "max_drop": self.max_drop if math.isfinite(self.max_drop) else None,
                "steps": [asdict(s) for s in self.steps],
                "chosen_step": chosen.step if chosen else None, "stopped": self.stopped}


def prune_within(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    max_drop: float,
    recover: Callable[[nn.Module, int], nn.Module],
    score: Callable[[nn.Module], float],
    levels: Sequence[float] = LEVELS,
    reference: float | None = None,
    done: Sequence[BudgetStep] = (),
    on_step: Callable[[BudgetStep, nn.Module], None] | None = None,
    **prune_kwargs: Any,
) -> BudgetResult:
    """Cut ``model`` to each of ``levels`` in turn while ``score`` stays within ``max_drop``.

    Each step prunes the previous step's recovered model (:func:`~bpl.pruning.prune`
    with ``prune_kwargs``, e.g. ``importance``) to the next level, calls
    ``recover(pruned, step)`` (fine-tune it; return the model to keep, e.g. with partners
    fused) and ``score(recovered)`` (higher is better, e.g. validation top-1 in points).
    A step whose score falls more than ``max_drop`` below ``reference`` (default:
    ``score(model)``) ends the search; the result's ``model`` is the last step within the
    budget. ``max_drop=math.inf`` takes every step (iterative pruning to ``levels[-1]``). ``on_step(step, recovered)`` sees every step (to save it). To continue a cut-off
    search, pass its finished steps as ``done``, its ``reference``, and as ``model`` the
    recovered model of its last step within the budget.
    """
    if not max_drop >= 0:
        raise InvalidArgumentError(f"{arg('max_drop')} must be 0 or more points, got {max_drop}",
                                   param="max_drop")
    if not levels or any(not 0 <= a < b < 1 for a, b in zip((0.0, *levels), levels, strict=False)):
        raise InvalidArgumentError(
            f"levels must rise strictly between 0 and 1, got {list(levels)}")
    reference = score(model) if reference is None and not done else reference
    if reference is None:
        raise InvalidArgumentError("continuing a search (done=...) needs its reference score")
    result = BudgetResult(reference, max_drop, list(done))
    result.model = model if result.chosen is not None else None
    if done and not done[-1].within:
        result.stopped = _beyond(done[-1], reference)
        return result
    base_macs = deploy_macs(model, example_inputs) / (1 - done[-1].macs_reduction if done else 1)
    current = model
    reached = done[-1].macs_reduction if done else 0.0
    for level in [lv for lv in levels if lv > (done[-1].target if done else 0.0)]:
        step = len(result.steps) + 1
        relative = 1 - (1 - level) / (1 - reached)
        try:
            pruned = prune(current, example_inputs, flops_reduction=relative,
                           accept_closest=True, **prune_kwargs)
        except PruningError as exc:
            result.stopped = f"step {step} could not cut further: {exc}"
            break
        reached_now = 1 - deploy_macs(pruned, example_inputs) / base_macs
        if reached_now <= reached + 1e-4:
            result.stopped = (f"step {step} could not cut further: the model has no channels "
                              f"left to remove at {100 * reached:.1f}% fewer MACs")
            break
        log.info("step %d: %.1f%% fewer MACs (asked %.1f%%); recovering", step,
                 100 * reached_now, 100 * level)
        recovered = recover(pruned, step)
        value = float(score(recovered))
        within = math.isinf(max_drop) or value >= reference - max_drop
        record = BudgetStep(step, level, reached_now, value, within)
        result.steps.append(record)
        log.info("step %d: score %.2f (reference %.2f)%s", step, value, reference,
                 "" if math.isinf(max_drop) else
                 f", budget {max_drop:g}: {'within' if within else 'beyond the budget'}")
        if on_step is not None:
            on_step(record, recovered)
        if not record.within:
            result.stopped = _beyond(record, reference)
            break
        result.model, current, reached = recovered, recovered, reached_now
    else:
        result.stopped = (f"the last level ({100 * levels[-1]:.0f}% fewer MACs) was reached"
                          + ("" if math.isinf(max_drop) else " within the budget"))
    return result


def _beyond(step: BudgetStep, reference: float) -> str:
    return (f"step {step.step} ({100 * step.macs_reduction:.1f}% fewer MACs) scored "
            f"{reference - step.score:.2f} points below the unpruned model: beyond the budget")
