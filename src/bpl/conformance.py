"""Does bpl work on this CNN? The checks behind ``benchmarks/zoo.py`` and the CI subset.

:func:`check_model` takes a model factory and an input, and runs extend -> fuse at
float64 and float32 (with partners made non-trivial), a strict load of the fused
weights into a fresh model, pruning to a MACs target, extend -> fuse after pruning,
ONNX export parity, and a float64 move after ``extend``. Each check is recorded as
passed or failed with its error, never raised, so one model's failure names itself.
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .deprecation import renamed_keywords
from .exporting import export
from .extension import extend, partner_blocks
from .fusion import fuse
from .modules import eval_mode, reports
from .profiling import count_macs
from .pruning import PruningError, prune
from .verification import max_relative_error, relative_error

__all__ = ["CHECKS", "check_model", "rounding_floor", "randomize_batchnorm", "randomize_partners", "float_dtypes"]

#: The checks of :func:`check_model`, in order, with their tolerance (None: pass/fail).
CHECKS: dict[str, float | None] = {
    "fuse_fp64": 1e-9,
    "fuse_fp32": 1e-4,
    "strict_load": None,
    "prune": 0.01,
    "prune_fuse": 1e-9,
    "onnx": 1e-4,
    "move_fp64": 1e-9,
}

#: A fusion passes where its error is within this many rounding floors (see _exact).
FLOOR_FACTOR = 10.0
#: Above this bar a check cannot judge anything (the randomised net's output is rounding
#: noise at that precision): it is reported as not judged, neither passed nor failed.
UNJUDGED_BAR = 1e-2


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.affine and m.track_running_stats:
            n = m.num_features
            for t, v in ((m.weight, torch.rand(n, generator=g) + 0.5),
                         (m.bias, torch.randn(n, generator=g) * 0.2),
                         (m.running_mean, torch.randn(n, generator=g) * 0.2),
                         (m.running_var, torch.rand(n, generator=g) + 0.5)):
                t.copy_(v.to(t.dtype))
    return model


@torch.no_grad()
def randomize_partners(model: nn.Module, seed: int = 1) -> nn.Module:
    """Make every partner contribute, as after training: random BNs and conv-partner scales."""
    randomize_batchnorm(model, seed)
    g = torch.Generator().manual_seed(seed)
    for _, block in partner_blocks(model):
        block.randomize_(g)
    return model


def float_dtypes(model: nn.Module) -> set[torch.dtype]:
    """The dtypes of every floating-point parameter and buffer of ``model``."""
    tensors = [*model.parameters(), *model.buffers()]
    return {t.dtype for t in tensors if t.is_floating_point()}


def _result(ok: bool, error: float | None = None, note: str = "") -> dict[str, Any]:
    return {"ok": bool(ok), "error": error, "note": note}


def rounding_floor(model: nn.Module, x: torch.Tensor, seed: int = 0) -> float:
    """How far ``model``'s output moves when its input is rounded at its dtype's precision.

    The input is perturbed relatively by one unit of rounding (``eps * N(0, 1)``); the
    relative change of the output is the least error any re-arrangement of the same
    arithmetic can promise. Deep, randomly scaled networks amplify it by many orders.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g).to(x.dtype)
    x_rounded = x * (1 + torch.finfo(x.dtype).eps * noise)
    with eval_mode(model), torch.no_grad():
        return max_relative_error(model(x), model(x_rounded))


def _exact(student: nn.Module, x: torch.Tensor, tol: float) -> dict[str, Any]:
    """Fuse ``student`` (partners randomised) and compare; fold_bn=True must be exact too.

    The bar is ``tol``, or ``FLOOR_FACTOR`` times the rounding floor where the randomised
    network is so ill-conditioned that rounding its input alone moves the output more.
    """
    randomize_partners(student.eval())
    err = relative_error(student, fuse(student), x)
    folded = relative_error(student, fuse(student, fold_bn=True), x)
    worst = max(err, folded)
    floor = rounding_floor(student, x)
    bar = max(tol, FLOOR_FACTOR * floor)
    note = f"fold_bn=True {folded:.1e}"
    if bar > tol:
        note += f"; ill-conditioned: input rounding alone moves the output {floor:.1e}"
    result = _result(worst <= bar, worst, note)
    result["floor"] = floor
    if bar > UNJUDGED_BAR:  # no error this size would say anything about the fusion
        result["unjudged"] = True
    return result


@contextlib.contextmanager
def _time_limit(seconds: float | None, what: str):
    """Raise TimeoutError in the block after ``seconds`` (SIGALRM; a no-op where unavailable)."""
    usable = (seconds and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{what} took longer than {seconds:g} s and was stopped")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@renamed_keywords(kernel_sizes="placement")
def check_model(
    build: Callable[[], nn.Module],
    x: torch.Tensor,
    *,
    placement: Any = "all",
    partner: str = "same",
    flops_reduction: float = 0.5,
    do_prune: bool = True,
    do_onnx: bool = True,
    time_limit: float | None = None,
) -> dict[str, Any]:
    """Run every check of :data:`CHECKS` on a fresh ``build()`` model with input ``x``.

    Returns ``{"partners": {site: count}, "skipped": {reason: count}, "checks":
    {name: {"ok", "error", "note"}}, "seconds": {name: s}}`` (and ``"fallback": {reason:
    count}`` where ``partner``'s kind could not sit beside some convs and the default kind
    went there). ``time_limit`` (seconds,
    main thread on Unix) stops a check that runs longer and records it as failed, so
    one check that never ends (a dependency graph search, say) does not hide the others. Partners go on every conv
    that can have one (``placement="all"``) unless told otherwise. A check that
    raises is recorded as failed with the exception's first line.
    """
    torch.manual_seed(0)
    base = randomize_batchnorm(build().eval())
    out: dict[str, Any] = {"checks": {}, "seconds": {}}
    state: dict[str, Any] = {}

    def run(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        start = time.perf_counter()
        try:
            with _time_limit(time_limit, name):
                out["checks"][name] = fn()
        except Exception as exc:  # recorded, not raised: the next check still runs
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            out["checks"][name] = _result(False, None, f"{type(exc).__name__}: {first}")
            out["checks"][name]["trace"] = traceback.format_exc()[-2000:]
        out["seconds"][name] = round(time.perf_counter() - start, 2)

    def fuse_fp64() -> dict[str, Any]:
        student = extend(base, partner=partner, placement=placement).double()
        report = reports(student)["extend"]
        out["partners"] = dict(Counter(report.sites.values()))
        if report.fallback:
            out["fallback"] = dict(Counter(_reason_kind(r) for r in report.fallback.values()))
        out["skipped"] = dict(Counter(_reason_kind(r) for r in report.skipped.values()))
        x64 = x.double()
        start = relative_error(base.double(), student, x64)
        base.float()
        if start != 0.0:
            return _result(False, start, "init='preserve' changed the output")
        return _exact(student, x64, CHECKS["fuse_fp64"])

    def fuse_fp32() -> dict[str, Any]:
        student = extend(base, partner=partner, placement=placement)
        result = _exact(student, x, CHECKS["fuse_fp32"])
        state["onnx_tol"] = max(CHECKS["onnx"], FLOOR_FACTOR * result["floor"])
        state["fused"] = fuse(student)
        state["student"] = student
        return result

    def strict_load() -> dict[str, Any]:
        fresh = build().eval()
        fresh.load_state_dict(state["fused"].state_dict(), strict=True)
        err = relative_error(state["fused"], fresh, x)
        return _result(err == 0.0, err)

    def pruning() -> dict[str, Any]:
        note = ""
        try:
            pruned = prune(base, x, flops_reduction=flops_reduction)
        except PruningError:  # per-layer ratios jump in coarse steps: rank channels globally
            pruned = prune(base, x, flops_reduction=flops_reduction, global_pruning=True)
            note = " (global pruning)"
        achieved = 1.0 - count_macs(pruned, x) / count_macs(base, x)
        state["pruned"] = pruned
        gap = abs(achieved - flops_reduction)
        used = reports(pruned)["prune"].round_to
        note += f", round_to {used}" if used and used > 1 else ", no rounding"
        return _result(gap <= CHECKS["prune"], gap, f"{100 * achieved:.1f}% fewer MACs{note}")

    def prune_fuse() -> dict[str, Any]:
        pruned = state["pruned"].double()
        return _exact(extend(pruned, partner=partner, placement=placement), x.double(), CHECKS["prune_fuse"])

    def onnx() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            path, note, inputs = Path(tmp) / "model.onnx", "", x
            try:
                info = export(state["student"], inputs, path, verify_tol=state["onnx_tol"])
            except Exception as exc:  # the exporter's limit, not bpl's: retry at 224 px
                if "adaptive_avg_pool2d" not in str(exc) or x.shape[-1] >= 224:
                    raise
                inputs = torch.randn(*x.shape[:2], 224, 224)
                info = export(state["student"], inputs, path, verify_tol=state["onnx_tol"])
                note = "at 224 px: ONNX exports adaptive pooling only to sizes dividing its input"
        if state["onnx_tol"] > CHECKS["onnx"]:
            note = "; ".join(filter(None, [note, f"ill-conditioned: bar {state['onnx_tol']:.1e}"]))
        result = _result(True, info["max_relative_error"], note)
        if state["onnx_tol"] > UNJUDGED_BAR:
            result["unjudged"] = True
        return result

    def move_fp64() -> dict[str, Any]:
        student = randomize_partners(extend(base, partner=partner, placement=placement).eval()).double()
        fused = fuse(student)
        dtypes = float_dtypes(fused)
        err = relative_error(student, fused, x.double())
        floor = rounding_floor(student, x.double())
        bar = max(CHECKS["move_fp64"], FLOOR_FACTOR * floor)
        ok = dtypes == {torch.float64} and err <= bar
        note = "dtypes " + ", ".join(sorted(str(d) for d in dtypes))
        if bar > CHECKS["move_fp64"]:
            note += f"; ill-conditioned: input rounding alone moves the output {floor:.1e}"
        result = _result(ok, err, note)
        if bar > UNJUDGED_BAR:  # the dtype check above still counts; the error says nothing
            result["unjudged_error"] = True
        return result

    run("fuse_fp64", fuse_fp64)
    run("fuse_fp32", fuse_fp32)
    if "fused" in state:
        run("strict_load", strict_load)
    if do_prune:
        run("prune", pruning)
        if "pruned" in state:
            run("prune_fuse", prune_fuse)
    if do_onnx and "student" in state:
        run("onnx", onnx)
    run("move_fp64", move_fp64)
    return out


def _reason_kind(reason: str) -> str:
    """A skipped conv's reason without its module names, for summaries."""
    if reason.startswith("kernel"):
        return "kernel not eligible"
    if "called more than once" in reason:
        return "called more than once"
    if "overrides Conv2d.forward" in reason:
        return reason
    return reason.split(":")[-1].strip()
