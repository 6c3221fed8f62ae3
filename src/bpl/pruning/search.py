"""The search for the pruning ratio that gives a MAC reduction (``flops_reduction``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import TypeVar

from ..errors import PruningError, arg

__all__ = ["ROUNDED_MAX_RATIO", "UNREACHABLE", "max_local_ratio", "over_round_to",
           "search_ratio"]

log = logging.getLogger(__name__)
#: A target above the largest reachable reduction by more than this is unreachable (0.01 points).
UNREACHABLE = 1e-4
#: The largest channel ratio the search tries with rounding (every group at its minimum).
ROUNDED_MAX_RATIO = 0.99


T = TypeVar("T")


def over_round_to(
    round_to: int | None, attempt: Callable[[int | None, bool], T], flops_reduction: float,
    tolerance: float, what: str = "the model",
) -> T:
    """``attempt(round_to, last)`` for ``round_to``, then its halves down to 1
    (:func:`~bpl.pruning.graph.round_to_fallbacks`), until one reaches ``flops_reduction`` without a
    :class:`PruningError`; the last one's error is raised. Coarse rounding (fast kernels)
    can make a MACs target unreachable where finer rounding reaches it."""
    from .graph import round_to_fallbacks  # graph imports this module

    candidates = round_to_fallbacks(round_to)
    for i, current in enumerate(candidates):
        last = i == len(candidates) - 1
        try:
            return attempt(current, last)
        except PruningError:
            if last:
                raise
            log.warning("%s cannot reach a %.2f%% MAC reduction on %s within %.1f points; "
                        "trying %s", arg("round_to", current), 100 * flops_reduction, what,
                        100 * tolerance, arg("round_to", candidates[i + 1]))
    raise AssertionError("unreachable: round_to_fallbacks is never empty")


def search_ratio(
    evaluate: Callable[[float], float],
    flops_reduction: float,
    p_max: float,
    tolerance: float,
    *,
    knob: str,
    max_trials: int = 16,
    accept_closest: bool = False,
    remedies: tuple[str, str] | None = None,
) -> tuple[float, float, int]:
    """Find ``p`` in ``(0, p_max]`` with ``evaluate(p)`` (a MAC reduction) near ``flops_reduction``.

    The reduction grows with ``p`` roughly like ``1 - (1 - p)^a``: the next guess
    interpolates in ``-log(1 - .)`` coordinates between the bracketing trials (bisection
    when that falls outside). Returns ``(p, reduction, trials)`` of the closest trial.
    A ``flops_reduction`` beyond the largest reduction (``evaluate(p_max)``), or one missed by more
    than ``tolerance``, raises :class:`PruningError` naming the closest reachable
    reduction, unless ``accept_closest``. ``remedies`` replaces what the two errors advise
    beyond another target (hard pruning's options by default): for an unreachable target,
    and for reductions that jump past it.
    """
    unreachable, coarse = remedies or (
        f", or pass {arg('accept_closest', True)} to take the closest",
        f"use global pruning ({arg('global_pruning', True)}), a smaller {arg('round_to')}, "
        f"another target, or pass {arg('accept_closest', True)} to take the closest")
    stop = tolerance / 4
    lo, hi = (0.0, 0.0), None
    tried: list[tuple[float, float]] = []
    guess = min(1.0 - math.sqrt(1.0 - flops_reduction), p_max)

    def u(x: float) -> float:
        return -math.log1p(-min(x, 1.0 - 1e-12))

    for _ in range(max_trials):
        p = guess
        f = evaluate(p)
        tried.append((p, f))
        log.debug("trial %d: %s %.4f -> MAC reduction %.2f%% (target %.2f%%)",
                 len(tried), knob, p, 100 * f, 100 * flops_reduction)
        if abs(f - flops_reduction) <= stop:
            break
        if f < flops_reduction:
            lo = (p, f)
            if p >= p_max:
                if flops_reduction - f > UNREACHABLE and not accept_closest:
                    raise PruningError(
                        f"a {100 * flops_reduction:.2f}% MAC reduction cannot be reached: the "
                        f"most this model allows is {100 * f:.2f}% (the maximum {knob}, "
                        f"{p_max:.4f}); ask for "
                        f"{arg('flops_reduction', math.floor(f * 1e4) / 1e4)} or less"
                        f"{unreachable}",
                        param="flops_reduction",
                    )
                break
        else:
            hi = (p, f)
        if hi is None:
            a = u(lo[1]) / u(lo[0]) if lo[0] > 0 and lo[1] > 0 else 2.0
            guess = 1.0 - (1.0 - flops_reduction) ** (1.0 / max(a, 1e-3))
            if not lo[0] < guess:
                guess = (lo[0] + p_max) / 2
            guess = min(guess, p_max)
        else:
            if hi[0] - lo[0] < 1e-4:  # a jump between two widths: nothing lies in between
                break
            ul, uh, vl, vh = u(lo[0]), u(hi[0]), u(lo[1]), u(hi[1])
            guess = -1.0
            if vh > vl:
                guess = -math.expm1(-(ul + (u(flops_reduction) - vl) * (uh - ul) / (vh - vl)))
            span = hi[0] - lo[0]
            if not lo[0] + 0.01 * span < guess < hi[0] - 0.01 * span:
                guess = (lo[0] + hi[0]) / 2
    p, f = min(tried, key=lambda t: abs(t[1] - flops_reduction))
    if abs(f - flops_reduction) > tolerance and not accept_closest:
        raise PruningError(
            f"no {knob} gives a MAC reduction within {100 * tolerance:.1f} points of "
            f"{100 * flops_reduction:.2f}% (closest: {100 * f:.2f}% at {p:.4f}); the reachable "
            f"reductions jump in coarse steps here: {coarse}", param="flops_reduction"
        )
    if abs(f - flops_reduction) > tolerance / 4:
        log.warning("MAC reduction %.2f%% instead of the %.2f%% asked (the closest reachable)",
                    100 * f, 100 * flops_reduction)
    return p, f, len(tried)


def max_local_ratio(sizes: Iterable[int], round_to: int | None) -> float:
    """Largest channel ratio worth trying when every group is pruned by the same ratio.

    Without rounding, Torch-Pruning keeps ``int(n * (1 - ratio))`` channels and skips a
    group entirely when that would leave none, so ratios beyond the one where the
    narrowest group keeps one channel would make the reduction non-monotonic. With
    rounding (``round_to`` above 1, :func:`~bpl.pruning.graph.rounded_keep`) no group is
    ever emptied, so the ratio may go up to :data:`ROUNDED_MAX_RATIO`.
    """
    if round_to is not None and round_to > 1:
        return ROUNDED_MAX_RATIO
    sizes = [n for n in sizes if n > 1]
    if not sizes:
        return 0.0
    return max(0.0, 1.0 - 1.01 / min(sizes))
