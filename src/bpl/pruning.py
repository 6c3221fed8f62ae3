"""Structured channel pruning, built on Torch-Pruning's dependency graph.

Two ways to a physically smaller model (see DESIGN.md):

* :func:`prune` (hard): remove the least important output channels of every prunable
  group now. With ``flops_reduction=r`` the channel pruning ratio is searched so that
  the MACs of the pruned model drop by ``r`` (within ``tolerance``, one point by
  default).
* :class:`SoftPruner` (the paper's reference code): during training of an extended
  model, zero the smallest-norm filters of each partner block and its partner every N
  epochs and keep them at zero; :meth:`SoftPruner.finalize` fuses the partners and then
  physically removes exactly the zeroed channels.

Torch-Pruning handles the coupling: channels joined by a residual addition or a
concatenation, depthwise convs, and a partner block (its conv and partner conv both feed
one addition, so they always lose the same channels). MACs are the FLOPs counted by
:class:`torch.utils.flop_counter.FlopCounterMode` divided by two, measured on the deployed
form of the model (an extended model is counted as if fused: partners cost nothing).

The ratio search prunes throw-away copies of the model on PyTorch's ``meta`` device
(shapes only, no memory, no arithmetic), scoring channels once on the real weights, so a
trial costs one graph trace instead of a copy of the weights.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import PruningError
from .extend import partner_blocks
from .fuse import fuse
from .modules import Inputs, as_args, eval_mode, unwrap_parallel
from .profile import count_macs, count_params
from .verify import max_relative_error, verify

__all__ = [
    "IMPORTANCES",
    "SOFT_IMPORTANCES",
    "FilterNormImportance",
    "PruneReport",
    "PruningError",
    "SoftPruner",
    "deploy_macs",
    "find_output_layers",
    "make_importance",
    "prune",
]

log = logging.getLogger(__name__)

#: Importance criteria accepted by :func:`prune` (a ``tp.importance.Importance`` works too).
IMPORTANCES: tuple[str, ...] = (
    "l2", "l1", "fpgm", "bn-scale", "random", "group-l2", "group-l1", "lamp",
)
#: Importance criteria accepted by :class:`SoftPruner`.
SOFT_IMPORTANCES: tuple[str, ...] = ("l2", "l1", "random")

_FILTER_FNS = (
    tp.prune_conv_out_channels,
    tp.prune_depthwise_conv_out_channels,
    tp.prune_linear_out_channels,
)

LayerRef = nn.Module | str


# --------------------------------------------------------------------------- importance


class FilterNormImportance(tp.importance.Importance):
    """The L``p`` norm of each output channel's filters (the paper's criterion for ``p=2``).

    When the group couples several convs (a partner block's conv and partner conv, or
    the convs feeding one residual addition), the channel's filters in all of them are
    taken together: ``(sum over convs of sum |w|^p) ** (1/p)``. BatchNorm scales and the
    consumers' input weights are not part of the score. Scores are divided by the group's
    mean, which matters only for global pruning (ranking across groups).
    """

    def __init__(self, p: int = 2) -> None:
        self.p = p

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        total = None
        for item in group:
            layer, fn = item.dep.target.module, item.dep.handler
            if fn not in _FILTER_FNS or getattr(layer, "transposed", False):
                continue
            root = item.root_idxs
            if root is None or any(r is None for r in root):
                continue
            w = layer.weight.detach()[item.idxs].flatten(1)
            score = w.abs().pow(self.p).sum(1).float().cpu()
            if total is None:
                total = torch.zeros(len(group[0].idxs))
            total.index_add_(0, torch.as_tensor(root, dtype=torch.long), score)
        if total is None:
            return None
        total = total.pow(1.0 / self.p)
        # Relative to the group's mean: ranks within a group are unchanged, and global
        # pruning compares groups with many coupled convs fairly with single convs.
        mean = total.mean()
        return total / mean if mean > 0 else total


def make_importance(importance: str | tp.importance.Importance) -> tp.importance.Importance:
    """The Torch-Pruning importance object for a criterion name (see :data:`IMPORTANCES`)."""
    if isinstance(importance, tp.importance.Importance):
        return importance
    factories: dict[str, Callable[[], tp.importance.Importance]] = {
        "l2": lambda: FilterNormImportance(2),
        "l1": lambda: FilterNormImportance(1),
        "fpgm": lambda: tp.importance.FPGMImportance(p=2),
        "bn-scale": tp.importance.BNScaleImportance,
        "random": tp.importance.RandomImportance,
        "group-l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "group-l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "lamp": tp.importance.LAMPImportance,
    }
    if not isinstance(importance, str) or importance not in factories:
        raise PruningError(
            f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCES)} "
            "or pass a torch_pruning.importance.Importance object"
        )
    return factories[importance]()


class _CachedImportance(tp.importance.Importance):
    """Scores computed once on the real model, looked up by the name of a group's root."""

    def __init__(self, scores: Mapping[str, torch.Tensor | None], model: nn.Module) -> None:
        self.scores = scores
        self.names = {m: n for n, m in model.named_modules()}

    def __call__(self, group: Any) -> torch.Tensor | None:
        name = self.names.get(group[0].dep.target.module)
        score = self.scores.get(name) if name is not None else None
        return None if score is None else score.clone()


# --------------------------------------------------------------------------- helpers


def _forward(model: nn.Module, args: Sequence[torch.Tensor]) -> Any:
    return model(*args)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on the meta device."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


class _Scratch:
    """Throw-away copies of a model for trials: on the meta device whenever the model runs there."""

    def __init__(self, model: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        meta_args = tuple(a.to("meta") for a in args)
        try:
            with torch.no_grad():
                trial = _meta_copy(model).eval()
                trial(*meta_args)
            self.meta, self.args = True, meta_args
        except Exception as exc:  # a model with data-dependent ops: fall back to real copies
            log.info("model does not run on the meta device (%s); trials copy the weights", exc)
            self.meta, self.args = False, args

    def copy(self, model: nn.Module) -> nn.Module:
        return _meta_copy(model) if self.meta else copy.deepcopy(model)


def deploy_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """MACs of ``model`` as deployed: an extended model is counted as if fused (no partners)."""
    args = as_args(example_inputs)
    if not partner_blocks(model):
        return count_macs(model, args)
    scratch = _Scratch(model, args)
    folded = scratch.copy(model).eval()
    fuse(folded, inplace=True)
    return count_macs(folded, scratch.args)


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


def _out_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    return None


def find_output_layers(model: nn.Module, example_inputs: Inputs) -> list[str]:
    """Names of the layers that produce the model's outputs (the classifier).

    A Linear/conv whose output tensor is returned as is; failing that (e.g. a conv
    classifier followed by pooling), the last Linear/conv executed whose output width
    equals the output's size in dim 1.
    """
    args = as_args(example_inputs)
    scratch = _Scratch(model, args)
    trial = scratch.copy(model)
    records: list[tuple[str, nn.Module, torch.Tensor]] = []
    hooks = []
    for name, module in trial.named_modules():
        if _out_width(module) is not None:
            hook = module.register_forward_hook(
                lambda m, i, o, name=name: records.append((name, m, o))
            )
            hooks.append(hook)
    try:
        with eval_mode(trial), torch.no_grad():
            outputs = _flat_tensors(trial(*scratch.args))
    finally:
        for hook in hooks:
            hook.remove()
    names = [name for name, _, o in records if any(o is t for t in outputs)]
    if not names:
        for t in outputs:
            if t.dim() >= 2:
                same = [name for name, m, _ in records if _out_width(m) == t.shape[1]]
                names += same[-1:]
    if not names:
        log.warning("found no layer that produces the model output; no layer is protected")
    return list(dict.fromkeys(names))


def _resolve_layers(model: nn.Module, layers: Iterable[LayerRef] | LayerRef | None) -> list[str]:
    """Qualified names of ``layers`` (modules of ``model`` or names); unknown ones raise."""
    if layers is None:
        return []
    if isinstance(layers, (nn.Module, str)):
        layers = [layers]
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in layers:
        if isinstance(layer, str):
            try:
                model.get_submodule(layer)
            except AttributeError:
                raise PruningError(
                    f"ignored layer {layer!r} is not a module of {type(model).__name__}; pass "
                    "qualified names from model.named_modules() (e.g. 'layer1.0.conv1') or the "
                    "model's own modules"
                ) from None
            out.append(layer)
        elif isinstance(layer, nn.Module):
            if id(layer) not in names:
                raise PruningError(
                    f"ignored layer {type(layer).__name__} is not part of {type(model).__name__}; "
                    "pass the model's own modules (not modules of a copy) or qualified names"
                )
            out.append(names[id(layer)])
        else:
            raise PruningError(
                f"ignored layers must be modules or qualified names, got {type(layer).__name__}"
            )
    return out


def _make_pruner(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    importance: tp.importance.Importance,
    ratio: float,
    *,
    ignored: Iterable[str],
    global_pruning: bool = False,
    round_to: int | None = None,
) -> tp.pruner.BasePruner:
    """A Torch-Pruning pruner on ``model``, traced in eval mode (training flags restored)."""
    with eval_mode(model), torch.enable_grad():
        return tp.pruner.BasePruner(
            model,
            list(args),
            importance=importance,
            pruning_ratio=ratio,
            global_pruning=global_pruning,
            round_to=round_to,
            ignored_layers=[model.get_submodule(n) for n in ignored],
            forward_fn=_forward,
        )


def _dependency_graph(model: nn.Module, args: tuple[torch.Tensor, ...]) -> tp.DependencyGraph:
    with eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=list(args), forward_fn=_forward
        )


def _check_fraction(value: float, what: str, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise PruningError(f"{what} must be a number strictly between 0 and 1, got {value!r}; {example}")
    return float(value)


def _check_round_to(round_to: int | None) -> None:
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise PruningError(f"round_to must be None or a positive int, got {round_to!r}")


def _search(
    evaluate: Callable[[float], float],
    target: float,
    p_max: float,
    tolerance: float,
    *,
    knob: str,
    max_trials: int = 16,
) -> tuple[float, float, int]:
    """Find ``p`` in ``(0, p_max]`` with ``evaluate(p)`` (a MAC reduction) near ``target``.

    The reduction grows with ``p`` roughly like ``1 - (1 - p)^a``: the next guess
    interpolates in ``-log(1 - .)`` coordinates between the bracketing trials (bisection
    when that falls outside). Returns ``(p, reduction, trials)`` of the closest trial.
    """
    stop = tolerance / 4
    lo, hi = (0.0, 0.0), None
    tried: list[tuple[float, float]] = []
    guess = min(1.0 - math.sqrt(1.0 - target), p_max)

    def u(x: float) -> float:
        return -math.log1p(-min(x, 1.0 - 1e-12))

    for _ in range(max_trials):
        p = guess
        f = evaluate(p)
        tried.append((p, f))
        log.debug("trial %d: %s %.4f -> MAC reduction %.2f%% (target %.2f%%)",
                 len(tried), knob, p, 100 * f, 100 * target)
        if abs(f - target) <= stop:
            break
        if f < target:
            lo = (p, f)
            if p >= p_max:
                if target - f > tolerance:
                    raise PruningError(
                        f"a {100 * target:.2f}% MAC reduction cannot be reached: the maximum "
                        f"{knob} {p_max:.4f} gives {100 * f:.2f}%; ask for at most that, or "
                        "ignore fewer layers"
                    )
                break
        else:
            hi = (p, f)
        if hi is None:
            a = u(lo[1]) / u(lo[0]) if lo[0] > 0 and lo[1] > 0 else 2.0
            guess = 1.0 - (1.0 - target) ** (1.0 / max(a, 1e-3))
            if not lo[0] < guess:
                guess = (lo[0] + p_max) / 2
            guess = min(guess, p_max)
        else:
            if hi[0] - lo[0] < 1e-4:  # a jump between two widths: nothing lies in between
                break
            ul, uh, vl, vh = u(lo[0]), u(hi[0]), u(lo[1]), u(hi[1])
            guess = -1.0
            if vh > vl:
                guess = -math.expm1(-(ul + (u(target) - vl) * (uh - ul) / (vh - vl)))
            span = hi[0] - lo[0]
            if not lo[0] + 0.01 * span < guess < hi[0] - 0.01 * span:
                guess = (lo[0] + hi[0]) / 2
    p, f = min(tried, key=lambda t: abs(t[1] - target))
    if abs(f - target) > tolerance:
        raise PruningError(
            f"no {knob} gives a MAC reduction within {100 * tolerance:.1f} points of "
            f"{100 * target:.2f}% (closest: {100 * f:.2f}% at {p:.4f}); the reachable "
            "reductions jump in coarse steps here: use global pruning (--global-pruning), a "
            "smaller round_to, or another target"
        )
    return p, f, len(tried)


# --------------------------------------------------------------------------- hard pruning


@dataclass
class PruneReport:
    """What :func:`prune` did (``pruned.bpl_prune_report``)."""

    channel_ratio: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    target: float | None = None
    trials: int = 0
    ignored: list[str] = field(default_factory=list)

    @property
    def reduction(self) -> float:
        """Achieved fraction of MACs removed."""
        return 1.0 - self.macs_after / self.macs_before

    def __str__(self) -> str:
        return (
            f"channel ratio {self.channel_ratio:.4f}: MACs {self.macs_before:,} -> "
            f"{self.macs_after:,} ({100 * self.reduction:.2f}% fewer), params "
            f"{self.params_before:,} -> {self.params_after:,}"
        )


def _max_local_ratio(sizes: Iterable[int], round_to: int | None) -> float:
    """Largest ratio at which every group keeps at least ``round_to`` (or one) channel.

    Torch-Pruning keeps ``int(n * (1 - ratio))`` channels and skips a group entirely when
    that would leave none, so ratios beyond this would make the reduction non-monotonic.
    """
    keep = round_to or 1
    sizes = [n for n in sizes if n > keep]
    if not sizes:
        return 0.0
    return max(0.0, 1.0 - (keep + 0.01) / min(sizes))


def prune(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    flops_reduction: float | None = None,
    channel_ratio: float | None = None,
    importance: str | tp.importance.Importance = "l2",
    global_pruning: bool = False,
    round_to: int | None = None,
    ignored_layers: Iterable[LayerRef] | LayerRef | None = None,
    inplace: bool = False,
    tolerance: float = 0.01,
) -> nn.Module:
    """Physically remove channels from ``model`` (plain or extended) and return it.

    Give exactly one of ``flops_reduction`` (fraction of MACs to remove; the channel
    ratio is searched until the reduction is within ``tolerance``) or ``channel_ratio``
    (fraction of each group's channels to remove). ``importance`` names the criterion
    (see :data:`IMPORTANCES`; ``"l2"`` is the paper's filter norm). The layers producing
    the model's outputs are never pruned, so the output shape is unchanged;
    ``ignored_layers`` (modules or qualified names) protects more. ``round_to`` keeps
    channel counts multiples of that number (faster kernels). The result carries a
    :class:`PruneReport` as ``bpl_prune_report``.
    """
    if (flops_reduction is None) == (channel_ratio is None):
        raise PruningError(
            "give exactly one of flops_reduction (e.g. 0.74 for 74% fewer MACs) or "
            "channel_ratio (fraction of channels to remove per layer)"
        )
    if flops_reduction is not None:
        flops_reduction = _check_fraction(
            flops_reduction, "flops_reduction", "pass e.g. 0.74 for 74% fewer MACs"
        )
    else:
        channel_ratio = _check_fraction(
            channel_ratio, "channel_ratio", "pass e.g. 0.5 to remove half the channels"
        )
    _check_round_to(round_to)
    imp = make_importance(importance)
    args = as_args(example_inputs)
    ignored = list(dict.fromkeys(
        _resolve_layers(model, ignored_layers) + find_output_layers(model, args)
    ))
    scratch = _Scratch(model, args)
    reference = scratch.copy(model)
    with eval_mode(reference), torch.no_grad():
        shapes = [t.shape for t in _flat_tensors(reference(*scratch.args))]
    macs_before = deploy_macs(reference, scratch.args)
    params_before = count_params(model)
    target = model if inplace else copy.deepcopy(model)
    options = {"ignored": ignored, "global_pruning": global_pruning, "round_to": round_to}
    trials = 0
    if channel_ratio is not None:
        ratio = channel_ratio
        _make_pruner(target, args, imp, ratio, **options).step()
    else:
        scores, sizes = _score_groups(target, args, imp, options)
        # Global ranking can empty a group, which Torch-Pruning then skips entirely; keep
        # the global search below the ratios where that becomes likely.
        p_max = 0.95 if global_pruning else _max_local_ratio(sizes, round_to)

        def reduction_at(p: float) -> float:
            trial = scratch.copy(target)
            cached = _CachedImportance(scores, trial)
            _make_pruner(trial, scratch.args, cached, p, **options).step()
            return 1.0 - deploy_macs(trial, scratch.args) / macs_before

        ratio, _, trials = _search(
            reduction_at, flops_reduction, p_max, tolerance, knob="channel ratio"
        )
        _make_pruner(target, args, _CachedImportance(scores, target), ratio, **options).step()
    check = scratch.copy(target)
    with eval_mode(check), torch.no_grad():
        new_shapes = [t.shape for t in _flat_tensors(check(*scratch.args))]
    if new_shapes != shapes:  # a protection failed: never hand back a model with other outputs
        raise PruningError(
            f"pruning changed the output shapes {shapes} -> {new_shapes}; pass the classifier "
            "in ignored_layers"
        )
    report = PruneReport(
        channel_ratio=ratio,
        macs_before=macs_before,
        macs_after=deploy_macs(check, scratch.args),
        params_before=params_before,
        params_after=count_params(target),
        target=flops_reduction,
        trials=trials,
        ignored=ignored,
    )
    log.info("pruned %s: %s", type(model).__name__, report)
    target.bpl_prune_report = report
    return target


def _score_groups(
    model: nn.Module, args: tuple[torch.Tensor, ...], importance: tp.importance.Importance,
    options: dict[str, Any],
) -> tuple[dict[str, torch.Tensor | None], list[int]]:
    """Importance of every prunable group of ``model`` (keyed by root name) and group sizes."""
    pruner = _make_pruner(model, args, importance, 0.0, **options)
    names = {m: n for n, m in model.named_modules()}
    scores: dict[str, torch.Tensor | None] = {}
    sizes = []
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        imp = importance(group)
        scores[names[group[0].dep.target.module]] = imp
        if imp is not None:
            # grouped convs rank one channel slot per group: Torch-Pruning's own bookkeeping
            sizes.append(len(imp) // pruner._get_channel_groups(group))
    return scores, sizes


# --------------------------------------------------------------------------- soft pruning


@dataclass(eq=False)
class _Slice:
    """Output channels of one module that a soft group controls."""

    module: nn.Module
    idxs: torch.Tensor  # channel indices in the module
    root: torch.Tensor  # the same channels as positions in the group's root conv


@dataclass(eq=False)
class _SoftGroup:
    name: str  # root conv (a partner block's conv) in the extended model
    deploy_name: str  # the same conv in the fused model
    size: int
    filters: list[_Slice]
    norms: list[_Slice]
    keep: torch.Tensor  # bool over the root's channels


def _keep_count(n: int, keep_ratio: float, round_to: int | None) -> int:
    if round_to and n > round_to:
        return min(n, max(round_to, round_to * round(n * keep_ratio / round_to)))
    return min(n, max(1, round(n * keep_ratio)))


class SoftPruner:
    """Soft filter pruning of an extended model, usable from any training loop.

    Each *group* is a set of output channels that Torch-Pruning removes together and
    that contains a partner block: the block's conv and partner conv, plus, when the
    block's output meets others in a residual addition, every conv and BN feeding that
    addition (so what is zeroed is exactly what :meth:`finalize` removes). Groups with
    grouped (non-depthwise) convs or with layers that cannot be zeroed exactly
    (anything but Conv/Linear/BatchNorm) are left alone and logged.

    A channel is scored by the norm of its filters in all the group's convs and
    Linears together (``"l2"``, the paper's choice; ``"l1"``; or ``"random"``). On an
    update, the lowest ``1 - keep_ratio`` of each group are zeroed: conv/Linear
    weights and biases and both BNs' weight, bias and running mean, so the channel's
    output is exactly 0 in train and eval mode. Gradient hooks zero the masked rows'
    gradients, and :meth:`apply` (call it after ``optimizer.step()``) re-zeroes them,
    because momentum and weight decay would otherwise revive them. Zeroed filters have
    norm 0, so they are picked again on the next update: masks only grow.

    ``keep_ratio`` is the fraction of each group's channels kept; with
    ``flops_reduction`` it is searched so that the model returned by :meth:`finalize`
    has that many fewer MACs than the fused unpruned model (within ``tolerance``).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Inputs,
        *,
        keep_ratio: float | None = None,
        flops_reduction: float | None = None,
        every: int = 1,
        importance: str = "l2",
        round_to: int | None = None,
        ignored_layers: Iterable[LayerRef] | LayerRef | None = None,
        tolerance: float = 0.01,
    ) -> None:
        model = unwrap_parallel(model)
        if not partner_blocks(model):
            raise PruningError(
                f"{type(model).__name__} has no partner blocks; SoftPruner works on an extended "
                "model: call bpl.extend(model) first (or use bpl.prune for a plain model)"
            )
        if (keep_ratio is None) == (flops_reduction is None):
            raise PruningError(
                "give exactly one of keep_ratio (fraction of channels kept per group) or "
                "flops_reduction (e.g. 0.74 for 74% fewer MACs)"
            )
        if keep_ratio is not None and (isinstance(keep_ratio, bool) or not 0.0 < keep_ratio <= 1.0):
            raise PruningError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
        if flops_reduction is not None:
            flops_reduction = _check_fraction(
                flops_reduction, "flops_reduction", "pass e.g. 0.74 for 74% fewer MACs"
            )
        if not isinstance(every, int) or every < 1:
            raise PruningError(f"every must be a positive number of epochs, got {every!r}")
        if importance not in SOFT_IMPORTANCES:
            raise PruningError(
                f"unknown soft-pruning importance {importance!r}; choose one of "
                f"{', '.join(SOFT_IMPORTANCES)}"
            )
        _check_round_to(round_to)
        self.model = model
        self.args = as_args(example_inputs)
        self.every = every
        self.importance = importance
        self.round_to = round_to
        self.flops_reduction = flops_reduction
        self.tolerance = tolerance
        self.updates = 0
        self.report: dict[str, Any] = {}
        ignored = list(dict.fromkeys(
            _resolve_layers(model, ignored_layers) + find_output_layers(model, self.args)
        ))
        self.groups = self._build_groups(ignored)
        if not self.groups:
            raise PruningError(
                f"no prunable channel group of {type(model).__name__} contains a partner block; "
                "extend convs whose output channels can be removed, or ignore fewer layers"
            )
        self._scratch = _Scratch(model, self.args)
        self.macs_before = deploy_macs(self._scratch.copy(model), self._scratch.args)
        if flops_reduction is not None:
            drop, _, _ = _search(
                self._reduction_at, flops_reduction, 0.999, tolerance, knob="drop ratio"
            )
            keep_ratio = 1.0 - drop
        self.keep_ratio = float(keep_ratio)
        self._zero_idx: dict[tuple[int, str], torch.Tensor | None] = {}
        self._on_device: dict[tuple[int, str, torch.device], torch.Tensor] = {}
        self._owners: dict[tuple[int, str], tuple[nn.Module, str]] = {}
        self._hooks = []
        for group in self.groups:
            for slices, attrs in ((group.filters, ("weight", "bias")),
                                  (group.norms, ("weight", "bias", "running_mean"))):
                for sl in slices:
                    for attr in attrs:
                        if getattr(sl.module, attr, None) is not None:
                            self._owners.setdefault((id(sl.module), attr), (sl.module, attr))
        for key, (module, attr) in self._owners.items():
            tensor = getattr(module, attr)
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                self._hooks.append(tensor.register_hook(self._grad_hook(key)))
        self._rebuild_masks()
        log.info("soft pruning %d channel groups, keep ratio %.4f, update every %d epochs",
                 len(self.groups), self.keep_ratio, every)

    # -- construction

    def _build_groups(self, ignored: list[str]) -> list[_SoftGroup]:
        model = self.model
        blocks = partner_blocks(model)
        block_of_conv = {id(b.conv): name for name, b in blocks}
        partner_ids = {id(b.partner_conv) for _, b in blocks} | set(block_of_conv)
        names = {m: n for n, m in model.named_modules()}
        pruner = _make_pruner(model, self.args, FilterNormImportance(2), 0.0, ignored=ignored)
        dg = pruner.DG
        groups = []
        for group in dg.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
        ):
            outs = [it.dep.target.module for it in group if dg.is_out_channel_pruning_fn(it.dep.handler)]
            if not any(id(m) in partner_ids for m in outs):
                continue
            root = next(m for m in outs if id(m) in block_of_conv)
            why = _unsupported(group, dg)
            if why:
                log.info("soft pruning skips the group of %s: %s", names[root], why)
                continue
            full = dg.get_pruning_group(root, tp.prune_conv_out_channels, list(range(root.out_channels)))
            filters, norms = [], []
            for it in full:
                if not dg.is_out_channel_pruning_fn(it.dep.handler):
                    continue
                module = it.dep.target.module
                if isinstance(module, _BatchNorm):
                    bucket = norms
                elif isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
                    bucket = filters
                else:  # graph-only nodes (additions, concatenations): nothing to zero
                    continue
                bucket.append(_Slice(module, torch.as_tensor(it.idxs, dtype=torch.long),
                                     torch.as_tensor(it.root_idxs, dtype=torch.long)))
            groups.append(_SoftGroup(
                name=names[root], deploy_name=block_of_conv[id(root)], size=root.out_channels,
                filters=filters, norms=norms, keep=torch.ones(root.out_channels, dtype=torch.bool),
            ))
        return groups

    def _reduction_at(self, drop: float) -> float:
        """MAC reduction of the fused model after removing ``drop`` of every group's channels."""
        trial = self._scratch.copy(self.model)
        dg = _dependency_graph(trial, self._scratch.args)
        for group in self.groups:
            n_drop = group.size - _keep_count(group.size, 1.0 - drop, self.round_to)
            if n_drop:
                root = trial.get_submodule(group.name)
                dg.get_pruning_group(root, tp.prune_conv_out_channels, list(range(n_drop))).prune()
        return 1.0 - deploy_macs(trial, self._scratch.args) / self.macs_before

    # -- masks

    def _rebuild_masks(self) -> None:
        """Per tensor, the channel indices to hold at zero (from every group's keep mask)."""
        zero: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in self._owners}
        for group in self.groups:
            dropped = ~group.keep
            for sl in group.filters + group.norms:
                idxs = sl.idxs[dropped[sl.root]]
                for attr in ("weight", "bias", "running_mean"):
                    if (id(sl.module), attr) in zero:
                        zero[(id(sl.module), attr)].append(idxs)
        self._zero_idx = {
            key: torch.unique(torch.cat(parts)) if parts and sum(map(len, parts)) else None
            for key, parts in zero.items()
        }
        self._on_device.clear()

    def _idx_on(self, key: tuple[int, str], device: torch.device) -> torch.Tensor | None:
        idx = self._zero_idx.get(key)
        if idx is None:
            return None
        cached = self._on_device.get((*key, device))
        if cached is None:
            cached = self._on_device[(*key, device)] = idx.to(device)
        return cached

    def _grad_hook(self, key: tuple[int, str]) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            idx = self._idx_on(key, grad.device)
            return None if idx is None else grad.index_fill(0, idx, 0.0)

        return hook

    @torch.no_grad()
    def apply(self) -> None:
        """Re-zero every masked channel (cheap; call it after each ``optimizer.step()``)."""
        for key, (module, attr) in self._owners.items():
            tensor = getattr(module, attr)
            idx = self._idx_on(key, tensor.device)
            if idx is not None:
                tensor.index_fill_(0, idx, 0.0)

    def after_step(self) -> None:
        """Training-loop hook name for :meth:`apply` (bpl's engine calls it after each step)."""
        self.apply()

    def scores(self) -> dict[str, torch.Tensor]:
        """Current importance of each group's channels (keyed by the root conv's name)."""
        out = {}
        for group in self.groups:
            if self.importance == "random":
                out[group.name] = torch.rand(group.size)
                continue
            p = 2 if self.importance == "l2" else 1
            total = torch.zeros(group.size)
            for sl in group.filters:
                w = sl.module.weight.detach()[sl.idxs.to(sl.module.weight.device)].flatten(1)
                total.index_add_(0, sl.root, w.abs().pow(p).sum(1).float().cpu())
            out[group.name] = total
        return out

    def update(self) -> None:
        """Pick the lowest-scoring channels of every group anew and zero them."""
        scores = self.scores()
        for group in self.groups:
            n_drop = group.size - _keep_count(group.size, self.keep_ratio, self.round_to)
            keep = torch.ones(group.size, dtype=torch.bool)
            keep[torch.argsort(scores[group.name], stable=True)[:n_drop]] = False
            group.keep = keep
        self.updates += 1
        self._rebuild_masks()
        self.apply()
        log.info("soft pruning update %d: %d of %d channels zeroed", self.updates,
                 sum(int((~g.keep).sum()) for g in self.groups), sum(g.size for g in self.groups))

    def epoch_end(self, epoch: int) -> bool:
        """Call after each epoch (0-based); updates the masks every ``every`` epochs."""
        if (epoch + 1) % self.every:
            return False
        self.update()
        return True

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Keep masks (True = kept) over each group's root-conv channels."""
        return {g.name: g.keep.clone() for g in self.groups}

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the masks stay as they are)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # -- state

    def state_dict(self) -> dict[str, Any]:
        """Masks and schedule state, to save with a training checkpoint."""
        return {
            "keep_ratio": self.keep_ratio,
            "every": self.every,
            "updates": self.updates,
            "masks": self.masks,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output and re-zero the masked channels."""
        masks = state.get("masks") if isinstance(state, Mapping) else None
        if not isinstance(masks, Mapping):
            raise PruningError("soft-pruning state has no 'masks'; pass SoftPruner.state_dict() output")
        mine = {g.name: g for g in self.groups}
        if set(masks) != set(mine):
            diff = sorted(set(masks) ^ set(mine))[:3]
            raise PruningError(
                f"soft-pruning state does not match this model (groups differ: {diff}); build the "
                "pruner on the same extended architecture it was saved from"
            )
        for name, mask in masks.items():
            if mask.shape != (mine[name].size,):
                raise PruningError(
                    f"soft-pruning mask for {name!r} has {tuple(mask.shape)} entries, the model "
                    f"has {mine[name].size} channels there; the state belongs to another model"
                )
        for name, mask in masks.items():
            mine[name].keep = mask.to("cpu", torch.bool).clone()
        self.keep_ratio = float(state.get("keep_ratio", self.keep_ratio))
        self.every = int(state.get("every", self.every))
        self.updates = int(state.get("updates", self.updates))
        self._rebuild_masks()
        self.apply()

    # -- the end

    def finalize(
        self,
        model: nn.Module | None = None,
        example_inputs: Inputs | None = None,
        *,
        tol: float = 1e-5,
    ) -> nn.Module:
        """Fuse the partners, then physically remove exactly the zeroed channels.

        Makes a last :meth:`update` first. Returns a new, smaller model with the
        architecture of the un-extended model (``model``, if given, must be the model
        the pruner was built on). It is checked in eval mode on ``example_inputs``
        (default: those given at construction) against the masked extended model:
        relative error <= ``tol``, else :class:`~bpl.errors.VerificationError`.
        ``self.report`` gets the MACs before and after, the reduction, and the errors of
        the fusion (``fusion_error``), of the removal (``removal_error``) and of both
        (``relative_error``).
        """
        if model is not None:
            model = unwrap_parallel(model)
            if model is not self.model:
                raise PruningError("finalize() got a different model than the pruner was built on")
        model = self.model
        device = next(model.parameters()).device
        check = as_args(example_inputs) if example_inputs is not None else self.args
        check = tuple(a.to(device) for a in check)
        self.update()
        was_training = model.training
        deploy = copy.deepcopy(model).eval()
        fuse(deploy, inplace=True)
        fusion_error = verify(model, deploy, *check, tol=tol)
        with torch.no_grad():
            fused_out = deploy(*check)
        dg = _dependency_graph(deploy, check)
        for group in self.groups:
            dropped = (~group.keep).nonzero().flatten().tolist()
            if dropped:
                root = deploy.get_submodule(group.deploy_name)
                dg.get_pruning_group(root, tp.prune_conv_out_channels, dropped).prune()
        with torch.no_grad():
            removal_error = max_relative_error(fused_out, deploy(*check))
        err = verify(model, deploy, *check, tol=tol)
        deploy.train(was_training)
        macs_after = deploy_macs(self._scratch.copy(deploy), self._scratch.args)
        reduction = 1.0 - macs_after / self.macs_before
        self.report = {
            "macs_before": self.macs_before,
            "macs_after": macs_after,
            "reduction": reduction,
            "target": self.flops_reduction,
            "keep_ratio": self.keep_ratio,
            "fusion_error": fusion_error,
            "removal_error": removal_error,
            "relative_error": err,
        }
        log.info("soft pruning finalized: MACs %d -> %d (%.2f%% fewer), relative error %.2g",
                 self.macs_before, macs_after, 100 * reduction, err)
        if self.flops_reduction is not None and abs(reduction - self.flops_reduction) > self.tolerance:
            log.warning("MAC reduction %.2f%% is off the target %.2f%%",
                        100 * reduction, 100 * self.flops_reduction)
        return deploy


def _unsupported(group: Any, dg: tp.DependencyGraph) -> str | None:
    """Why a group's channels cannot be zeroed exactly and removed by index (None if they can)."""
    for it in group:
        module = it.dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd):
            if getattr(module, "transposed", False):
                return f"transposed conv {type(module).__name__}"
            if module.groups > 1 and not module.groups == module.in_channels == module.out_channels:
                return f"grouped conv (groups={module.groups})"
        elif dg.is_out_channel_pruning_fn(it.dep.handler) and not isinstance(
            module, (nn.Linear, _BatchNorm)
        ) and isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            return f"{type(module).__name__} cannot be zeroed exactly"
        if isinstance(module, _BatchNorm) and not (module.affine and module.track_running_stats):
            return "BatchNorm without affine parameters or running statistics"
    return None

