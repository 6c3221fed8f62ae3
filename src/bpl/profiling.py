"""MACs, parameter counts and CPU latency of a model.

MACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` and halved
(one multiply-accumulate is two FLOPs): the number papers usually call "FLOPs".
Latency is the median wall-clock time of repeated forward passes after a warm-up, in
eval mode under :func:`torch.inference_mode`. To compare two models fairly, time them
interleaved in one run (:func:`compare_latency`), so that frequency scaling, other
processes and cache state affect both alike.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import InvalidArgumentError
from .modules import Inputs, as_args, eval_mode

__all__ = [
    "as_args",
    "compare_latency",
    "conv_widths",
    "count_macs",
    "count_params",
    "profile",
    "speed_note",
]

#: Channel counts CPU kernels handle in full vector blocks are multiples of this.
FAST_MULTIPLE = 8
#: A runtime below this fraction of the ideal speedup gets a note from :func:`speed_note`.
SLOW_FRACTION = 0.6

log = logging.getLogger(__name__)

def count_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (FLOPs / 2).

    The model runs in eval mode without gradients, so BatchNorm statistics are not
    touched. Only the ops FlopCounterMode knows are counted (convolutions, matmuls,
    ...), not BatchNorm, activations, pooling or additions.
    """
    args = as_args(example_inputs)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(*args)
    return int(counter.get_total_flops()) // 2


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _batched(args: tuple[torch.Tensor, ...], batch_size: int | None) -> tuple[torch.Tensor, ...]:
    """``args`` with the first sample repeated to ``batch_size`` (or as given when None)."""
    if batch_size is None:
        return args
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    return tuple(
        a[:1].expand(batch_size, *a.shape[1:]).contiguous(memory_format=_memory_format(a))
        for a in args
    )


def _memory_format(a: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor stored that way (so batching keeps it), else contiguous."""
    if a.dim() == 4 and a.shape[1] > 1 and a.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` intra-op threads (when given) and restore the count afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def compare_latency(
    models: Mapping[str, nn.Module],
    example_inputs: Inputs,
    *,
    batch_size: int | None = None,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    min_sample_ms: float = 0.0,
) -> dict[str, float]:
    """Median latency in milliseconds of each model, timed interleaved (A, B, A, B, ...).

    Every model gets ``warmup`` untimed passes, then ``repeats`` timed samples taken in
    turn with the others, so that the ratio of two medians is a fair speed ratio. A
    sample is one pass, or, with ``min_sample_ms``, as many back-to-back passes as take
    at least that long (counted from the last warm-up pass, as ``timeit`` does), divided
    by their number, after as many untimed ones: a fast model is then neither timed at
    the clock's grain nor cold. (A model that runs alone keeps its weights in the CPU's
    caches; interleaved with a larger one it loses them, and its first passes after the
    switch ran up to 40% slower here: resnet50 pruned to half its MACs, 64 px, batch 1,
    onnxruntime. The untimed passes give it back the state it runs in when deployed.)
    With ``batch_size`` the first sample of ``example_inputs`` is repeated to that batch.
    Models run in eval mode under ``torch.inference_mode``; their training flags and the
    torch thread count are restored afterwards.
    """
    if not models:
        raise InvalidArgumentError("compare_latency needs at least one model")
    if repeats < 1 or warmup < 0 or min_sample_ms < 0:
        raise InvalidArgumentError("need repeats >= 1, warmup >= 0 and min_sample_ms >= 0, got "
                                   f"{repeats}, {warmup} and {min_sample_ms}")
    args = _batched(as_args(example_inputs), batch_size)
    times: dict[str, list[float]] = {name: [] for name in models}
    with _threads(threads), eval_mode(*models.values()), torch.inference_mode():
        placed = {}
        for name, model in models.items():
            device = _device_of(model)
            placed[name] = (model, tuple(a.to(device) for a in args), device)
        passes = dict.fromkeys(models, 1)
        for k in range(warmup):
            for name, (model, margs, device) in placed.items():
                start = time.perf_counter()
                model(*margs)
                _sync(device)
                if k == warmup - 1 and min_sample_ms > 0:
                    took = (time.perf_counter() - start) * 1e3
                    passes[name] = max(1, math.ceil(min_sample_ms / max(took, 1e-6)))
        for _ in range(repeats):
            for name, (model, margs, device) in placed.items():
                if passes[name] > 1:  # warm again after the others ran (docstring)
                    for _ in range(passes[name]):
                        model(*margs)
                _sync(device)
                start = time.perf_counter()
                for _ in range(passes[name]):
                    model(*margs)
                _sync(device)
                times[name].append((time.perf_counter() - start) * 1e3 / passes[name])
    result = {name: statistics.median(t) for name, t in times.items()}
    log.debug("latency (ms, median of %d samples of %s passes): %s", repeats, passes, result)
    return result


def profile(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    latency: bool = True,
    batch_size: int | None = None,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
) -> dict[str, Any]:
    """MACs and parameters of ``model``, and (with ``latency=True``) its median latency.

    Returns ``{"macs", "params", "input_shapes"}`` plus, when timed, ``"latency_ms"``
    (median over ``repeats`` passes after ``warmup``), ``"batch_size"`` and ``"threads"``.
    ``macs`` is counted on ``example_inputs`` exactly as given (so it scales with their
    batch size); ``batch_size`` only changes the batch that is timed.
    """
    args = as_args(example_inputs)
    report: dict[str, Any] = {
        "macs": count_macs(model, args),
        "params": count_params(model),
        "input_shapes": [list(a.shape) for a in args],
    }
    if latency:
        with _threads(threads) as used:
            ms = compare_latency(
                {"model": model}, args, batch_size=batch_size, warmup=warmup, repeats=repeats
            )["model"]
        report.update(
            latency_ms=ms,
            batch_size=batch_size if batch_size is not None else int(args[0].shape[0]),
            threads=used,
        )
    return report


def conv_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every convolution of ``model``, by qualified name."""
    return {name: m.out_channels for name, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd)}


def speed_note(
    widths: Mapping[str, int],
    fraction_of_ideal: Mapping[str, Mapping[int, float]] | None = None,
    *,
    multiple: int = FAST_MULTIPLE,
    slow: float = SLOW_FRACTION,
) -> str | None:
    """One line on why a compressed model may run short of its ideal speedup, or None.

    ``widths`` are the compressed model's conv widths (:func:`conv_widths`); widths
    narrower than ``2 * multiple`` are not counted (``bpl.prune`` leaves them unrounded,
    and they are too narrow to matter). ``fraction_of_ideal`` maps runtime -> batch size
    -> measured speedup / ideal speedup. The line names the odd widths and the runtimes
    under ``slow``, and suggests a fix.
    """
    odd = {n: w for n, w in widths.items() if w >= 2 * multiple and w % multiple}
    slow_runs = sorted(
        ((f, rt, bs) for rt, by_bs in (fraction_of_ideal or {}).items()
         for bs, f in by_bs.items() if f < slow),
        key=lambda t: t[0],
    )
    if not odd and not slow_runs:
        return None
    said = []
    if odd:
        name, width = next(iter(odd.items()))
        said.append(f"{len(odd)} of {len(widths)} conv widths are not multiples of {multiple} "
                    f"(e.g. {name}: {width})")
    if slow_runs:
        said.append(", ".join(f"{rt} at batch {bs} reaches {f:.2f} of the ideal speedup"
                              for f, rt, bs in slow_runs[:3])
                    + f" (under {slow:g})")
    fix = (f"prune again with --round-to {multiple} (the default), whose widths CPU kernels "
           "run in full blocks" if odd else
           "the widths are fine: at small inputs per-layer fixed costs dominate; larger "
           "batches or `bpl export` (onnxruntime, TorchScript) run closer to the ideal")
    return "note: " + "; ".join(said) + "; " + fix
