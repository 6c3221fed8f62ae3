"""What a pruned model's layers cost on a runtime: a measured, cached table of layer latencies.

Pruning to a speedup (:mod:`.speed`) needs to know where the cuts buy time. A layer's
MACs do not say it: a depthwise conv costs far more than its MACs, a grouped conv whose
per-group width falls off the runtime's fast kernels can slow down as it narrows. So
every conv and linear layer of the model is timed alone, on the runtime it will be
deployed on (:class:`RuntimeMeasure`), at the batch and input size it will see, on a
small grid of its input and output widths (:data:`GRID`), as NetAdapt and HALP do with
their per-layer lookup tables. Between grid points the table interpolates bilinearly.

The table is measured once and kept on disk (:func:`latency_cache_dir`), keyed on the
runtime and its version, the threads, the batch, the CPU model and every layer's
shapes (which carry the input size and the architecture's widths); the next pruning of
the same model on the same machine reads it back.

A layer timed alone is not the layer inside the model: the runtime fuses activations
into convs, converts layouts at the graph's edges, and the elementwise ops (additions,
pooling) are not in the table. The table ranks the cuts; the speedup itself is always
measured on the whole deployed model (:mod:`.speed`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidArgumentError
from ..files import atomic_write_json
from ..modules import eval_mode
from ..profiling import compare_latency

__all__ = [
    "GRID",
    "RUNTIMES",
    "Layer",
    "LatencyTable",
    "Measure",
    "RuntimeMeasure",
    "cpu_name",
    "latency_cache_dir",
    "layer_module",
]

log = logging.getLogger(__name__)

#: The runtimes a speedup can be measured in: onnxruntime runs the ONNX export (BN folded),
#: torch the deploy form of `bpl predict` (BN folded, channels_last).
RUNTIMES = ("onnxruntime", "torch")
#: The widths each layer is timed at, as fractions of its own (plus its narrowest reachable).
GRID = (1.0, 0.75, 0.5, 0.3, 0.15)
#: Bump when what a table holds changes, so old files are measured again.
TABLE_VERSION = 2

#: One timed case: a plain PyTorch module and the input (whole batch) it runs on.
Case = tuple[nn.Module, torch.Tensor]
#: Times cases interleaved in one runtime and returns each one's median latency in ms.
#: Anything with this signature can stand in for :class:`RuntimeMeasure` (tests pass a
#: deterministic one); its ``key`` attribute, if any, goes into the cache key.
Measure = Callable[[Mapping[str, Case]], Mapping[str, float]]


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def latency_cache_dir() -> Path:
    """Where latency tables are kept: ``$BPL_CACHE_DIR/latency`` when that is set (the
    decoded-image cache's folder), else ``$XDG_CACHE_HOME/bpl/latency``
    (``~/.cache/bpl/latency``)."""
    if os.environ.get("BPL_CACHE_DIR"):
        return Path(os.environ["BPL_CACHE_DIR"]).expanduser() / "latency"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "bpl" / "latency"


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise InvalidArgumentError(
            f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return runtime


class _Bound(nn.Module):
    """A runner bound to its own input: ``compare_latency`` interleaves runners whose
    inputs differ (each layer of the table at its own widths)."""

    def __init__(self, runner: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.runner = runner
        self.x = x

    def forward(self, *_: Any) -> Any:
        return self.runner(self.x)


class RuntimeMeasure:
    """Time plain PyTorch modules as a runtime deploys them, interleaved, medians in ms.

    ``runtime="torch"``: :func:`~bpl.exporting.deploy_form` (BN folded, channels_last,
    fed channels_last inputs); ``"onnxruntime"``: the BN-folded ONNX export in an
    onnxruntime session (:class:`~bpl.exporting.OnnxModule`) with ``threads`` intra-op
    threads. All cases of one call run in turn, ``warmup`` untimed passes then
    ``repeats`` timed samples of at least ``min_sample_ms`` each (back-to-back passes,
    after as many untimed ones; :func:`~bpl.profiling.compare_latency`), so their ratios
    are fair, and a fast model is timed as precisely as a large one and as warm as it
    runs alone. A module :meth:`pin`-ned (the unpruned model, timed beside every trial)
    is converted once.
    """

    def __init__(self, runtime: str = "onnxruntime", threads: int | None = None, *,
                 warmup: int = 3, repeats: int = 15, min_sample_ms: float = 20.0) -> None:
        self.runtime = check_runtime(runtime)
        self.threads = threads or torch.get_num_threads()
        self.warmup, self.repeats, self.min_sample_ms = warmup, repeats, min_sample_ms
        self._pinned: dict[int, tuple[nn.Module, nn.Module]] = {}
        version = torch.__version__
        if runtime == "onnxruntime":
            from ..exporting import _require_onnx

            version = _require_onnx()[1].__version__
        #: What the cache key records of this measure.
        self.key = f"{runtime} {version}, {self.threads} threads"

    def for_table(self) -> RuntimeMeasure:
        """The same runtime with shorter samples (5 ms) for the per-layer table, which
        ranks cuts and times hundreds of layer shapes; whole models keep ``min_sample_ms``."""
        lighter = RuntimeMeasure(self.runtime, self.threads, warmup=self.warmup,
                                 repeats=self.repeats, min_sample_ms=min(5.0, self.min_sample_ms))
        lighter.key = self.key
        return lighter

    def pin(self, model: nn.Module, x: torch.Tensor) -> None:
        """Convert ``model`` once and reuse that runner whenever it is timed again."""
        self._pinned[id(model)] = (model, self.runner(model, x))

    def unpin(self, model: nn.Module) -> None:
        """Forget the runner :meth:`pin` kept for ``model`` (it is about to change)."""
        self._pinned.pop(id(model), None)

    def runner(self, model: nn.Module, x: torch.Tensor) -> nn.Module:
        """``model`` as the runtime runs it (BN folded; a pinned model's runner reused)."""
        held = self._pinned.get(id(model))
        if held is not None and held[0] is model:
            return held[1]
        from torch.nn.modules.batchnorm import _BatchNorm

        from ..exporting import ChannelsLast, OnnxModule, _write_onnx
        from ..fusion import fold_batchnorm

        # a copy, on the CPU, in eval mode: the caller's model is left as it was
        if any(isinstance(m, _BatchNorm) for m in model.modules()):
            with eval_mode(model):
                model = fold_batchnorm(model)
        else:
            model = copy.deepcopy(model)
        model = model.cpu().eval()
        if self.runtime == "torch":
            return ChannelsLast(model).eval()  # deploy_form, for models folded or not
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            _write_onnx(model, x[:1].contiguous(), str(path), 17)
            return OnnxModule(path, threads=self.threads)  # the session holds the model

    def __call__(self, cases: Mapping[str, Case]) -> dict[str, float]:
        bound = {}
        for name, (model, x) in cases.items():
            if self.runtime == "torch" and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            bound[name] = _Bound(self.runner(model, x), x)
        return compare_latency(bound, torch.zeros(1), threads=self.threads,
                               warmup=self.warmup, repeats=self.repeats,
                               min_sample_ms=self.min_sample_ms)


@dataclass
class Layer:
    """One conv or linear layer of the model and how the pruning groups set its widths.

    ``in_terms``/``out_terms``: ``(group, channels per group channel)``; removing ``r``
    channels of the group removes ``r * mult`` of the layer's inputs (outputs). A
    depthwise conv's inputs follow its outputs.
    """

    name: str
    kind: str  # type name of the module: Conv1d/2d/3d or Linear
    c_in: int
    c_out: int
    groups: int = 1
    depthwise: bool = False
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: Any = ()
    dilation: tuple[int, ...] = ()
    in_shape: tuple[int, ...] = ()  # the input's shape after the channel dim, one sample
    macs: int = 0  # one sample, at full width
    in_terms: list[tuple[str, float]] = field(default_factory=list)
    out_terms: list[tuple[str, float]] = field(default_factory=list)

    def widths(self, removed: Mapping[str, int]) -> tuple[int, int]:
        """``(inputs, outputs)`` when each group has ``removed[group]`` channels fewer."""
        c_out = self.c_out - sum(round(removed.get(g, 0) * m) for g, m in self.out_terms)
        c_in = self.c_in - sum(round(removed.get(g, 0) * m) for g, m in self.in_terms)
        if self.depthwise:
            c_in = c_out * self.c_in // self.c_out
        return max(1, c_in), max(1, c_out)

    def signature(self, in_axis: Sequence[int], out_axis: Sequence[int]) -> str:
        """What makes two layers' tables the same: type, shapes, input size, the grid."""
        return json.dumps([self.kind, self.c_in, self.c_out, self.groups, self.depthwise,
                           list(self.kernel), list(self.stride), str(self.padding),
                           list(self.dilation), list(self.in_shape), list(in_axis),
                           list(out_axis)])


def layer_module(layer: Layer, c_in: int, c_out: int) -> nn.Module:
    """A fresh module of ``layer``'s kind at widths ``c_in`` -> ``c_out`` (with a bias,
    as BN folding leaves one)."""
    if layer.kind == "Linear":
        return nn.Linear(c_in, c_out)
    cls = getattr(nn, layer.kind)
    groups = c_in if layer.depthwise else layer.groups
    return cls(c_in, c_out, layer.kernel, stride=layer.stride, padding=layer.padding,
               dilation=layer.dilation, groups=groups, bias=True)


def _interp(axis: Sequence[int], v: float) -> tuple[int, int, float]:
    """Indices ``i, j`` of ``axis`` around ``v`` and the weight of ``j`` (clamped)."""
    if len(axis) == 1 or v <= axis[0]:
        return 0, 0, 0.0
    if v >= axis[-1]:
        return len(axis) - 1, len(axis) - 1, 0.0
    j = next(k for k, a in enumerate(axis) if a >= v)
    i = j - 1
    return i, j, (v - axis[i]) / (axis[j] - axis[i])


@dataclass
class LayerTable:
    """Measured latencies of one layer on a grid of widths (ms, whole batch, less the
    runtime's per-call overhead)."""

    in_axis: list[int]
    out_axis: list[int]
    ms: list[list[float]]  # [in index][out index]; a depthwise layer: one row, by outputs
    overhead_ms: float = 0.0  # the per-call cost taken off each entry

    def at(self, c_in: int, c_out: int) -> float:
        """Bilinear interpolation, clamped to the grid."""
        i0, i1, a = _interp(self.in_axis, c_in)
        j0, j1, b = _interp(self.out_axis, c_out)
        ms = self.ms
        top = ms[i0][j0] * (1 - b) + ms[i0][j1] * b
        bottom = ms[i1][j0] * (1 - b) + ms[i1][j1] * b
        return top * (1 - a) + bottom * a


class LatencyTable:
    """The per-layer tables of one model: predicted latency of any allocation of widths."""

    def __init__(self, layers: Sequence[Layer], tables: Mapping[str, LayerTable],
                 signatures: Mapping[str, str]) -> None:
        self.layers = list(layers)
        self.tables = tables
        self.signatures = signatures  # layer name -> its table's signature

    def layer_ms(self, layer: Layer, removed: Mapping[str, int]) -> float:
        table = self.tables[self.signatures[layer.name]]
        c_in, c_out = layer.widths(removed)
        if layer.depthwise:
            return table.at(table.in_axis[0], c_out)
        return table.at(c_in, c_out)

    def total(self, removed: Mapping[str, int]) -> float:
        """Predicted latency (ms): the sum of the layers' interpolated times."""
        return sum(self.layer_ms(layer, removed) for layer in self.layers)


def _axis(base: int, terms: list[tuple[str, float]], narrowest: int, unit: int) -> list[int]:
    """The widths a layer is timed at along one dim: :data:`GRID` of ``base``, on
    multiples of ``unit`` (the widths pruning can produce), and its narrowest reachable."""
    if not terms:
        return [base]
    values = {base, max(1, narrowest)}
    for f in GRID[1:]:
        v = unit * round(base * f / unit) if unit > 1 else round(base * f)
        values.add(min(base, max(narrowest, v, 1)))
    return sorted(values)


def build_table(
    layers: Sequence[Layer],
    narrowest: Mapping[str, tuple[int, int]],
    units: Mapping[str, tuple[int, int]],
    measure: Measure,
    *,
    batch: int,
    cache: Path | None,
    key: Mapping[str, Any],
) -> tuple[LatencyTable, dict[str, Any]]:
    """Time every distinct layer of ``layers`` on its grid (or read the tables from the
    cache file for ``key``); ``narrowest``/``units``: per layer, the narrowest reachable
    ``(inputs, outputs)`` and the step of each. Returns the table and what was done."""
    signatures: dict[str, str] = {}
    grids: dict[str, tuple[Layer, list[int], list[int]]] = {}
    for layer in layers:
        lo_in, lo_out = narrowest[layer.name]
        u_in, u_out = units[layer.name]
        out_axis = _axis(layer.c_out, layer.out_terms, lo_out, u_out)
        in_axis = ([layer.c_in] if layer.depthwise
                   else _axis(layer.c_in, layer.in_terms, lo_in, u_in))
        sig = layer.signature(in_axis, out_axis)
        signatures[layer.name] = sig
        grids.setdefault(sig, (layer, in_axis, out_axis))
    full_key = {**key, "version": TABLE_VERSION, "grid": list(GRID), "batch": batch,
                "layers": sorted(grids)}
    digest = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"{key.get('runtime', 'custom')}-{digest}.json" if cache else None
    stored = _read(path, full_key)
    info: dict[str, Any] = {"path": str(path) if path else None, "layers": len(grids),
                            "cached": stored is not None}
    if stored is None:
        stored = {}
        for_table = getattr(measure, "for_table", None)  # RuntimeMeasure's shorter samples
        timer = for_table() if for_table is not None else measure
        for n, (sig, (layer, in_axis, out_axis)) in enumerate(grids.items()):
            stored[sig] = _time_layer(layer, in_axis, out_axis, timer, batch)
            log.debug("latency table %d/%d: %s", n + 1, len(grids), layer.name)
        if path is not None:
            try:
                atomic_write_json(path, {"key": full_key, "tables": stored,
                                         "measured": _conditions()})
            except OSError as exc:  # a read-only cache folder: measured, just not kept
                log.warning("could not keep the latency table in %s: %s", path, exc)
    tables = {sig: LayerTable(**t) for sig, t in stored.items()}
    return LatencyTable(layers, tables, signatures), info


def _conditions() -> dict[str, Any]:
    """When and under what load a table was measured (kept beside it, not in its key: a
    table measured on a busy machine is worth deleting and measuring again)."""
    import time

    try:
        load = [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        load = None
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": load,
            "cpu_count": os.cpu_count()}


def _read(path: Path | None, key: Mapping[str, Any]) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("key") != json.loads(json.dumps(key)):
        return None
    log.info("latency table read from %s", path)
    return data["tables"]


def _time_layer(layer: Layer, in_axis: list[int], out_axis: list[int], measure: Measure,
                batch: int) -> dict[str, Any]:
    """One layer at every width pair of its grid, timed interleaved in one call."""
    torch.manual_seed(0)
    pairs = ([(c_out * layer.c_in // layer.c_out, c_out) for c_out in out_axis]
             if layer.depthwise else [(a, b) for a in in_axis for b in out_axis])
    cases = {}
    for a, b in pairs:
        module = layer_module(layer, a, b).eval()
        cases[f"{a}x{b}"] = (module, torch.randn(batch, a, *layer.in_shape))
    # what one call costs with next to no work (the runtime's own per-call overhead, which
    # a layer inside the model does not pay): timed alongside, taken off every entry
    cases["overhead"] = (nn.Conv2d(1, 1, 1).eval(), torch.randn(1, 1, 1, 1))
    with torch.no_grad():
        ms = measure(cases)
    overhead = float(ms["overhead"])

    def net(a: int, b: int) -> float:
        return max(0.0, float(ms[f"{a}x{b}"]) - overhead)

    if layer.depthwise:
        return {"in_axis": [layer.c_in], "out_axis": out_axis, "overhead_ms": overhead,
                "ms": [[net(a, b) for a, b in pairs]]}
    return {"in_axis": in_axis, "out_axis": out_axis, "overhead_ms": overhead,
            "ms": [[net(a, b) for b in out_axis] for a in in_axis]}
