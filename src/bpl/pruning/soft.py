"""Soft pruning (the paper's reference code): zero filters while training, remove them at the end."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..deprecation import renamed_attribute, renamed_keywords, warn_deprecated
from ..errors import PruningError, arg
from ..extension import Placement, partner_blocks
from ..fusion import fuse
from ..modules import Inputs, Scratch, as_args, find_output_layers, record_report, unwrap_parallel
from ..verification import max_relative_error, verify
from .graph import (
    DEFAULT_ROUND_TO,
    LayerRef,
    check_fraction,
    check_round_to,
    dependency_graph,
    deploy_macs,
    resolve_layers,
)
from .importance import make_importance
from .search import over_round_to, search_ratio
from .soft_groups import build_soft_groups, keep_count
from .soft_masks import ChannelMasks

__all__ = ["SoftPruner", "SoftReport", "SOFT_PARTNERS"]

#: What a re-mask does to the partners between re-masks: let their zeroed filters regrow
#: (the reference code: it masks only the block's gradients) or hold them at zero too.
SOFT_PARTNERS: tuple[str, ...] = ("regrow", "masked")

log = logging.getLogger(__name__)


@dataclass
class SoftReport:
    """What :meth:`SoftPruner.finalize` did (``bpl.reports(deployed)["soft"]``).

    ``report["removal_error"]`` reads a field too, as when the report was a dict.
    ``channel_ratio`` is the fraction of each group's channels removed, as in
    :class:`~bpl.PruneReport` (``keep_ratio``, the fraction kept, goes in bpl 0.3).
    """

    macs_before: int
    macs_after: int
    reduction: float
    target: float | None
    channel_ratio: float
    fusion_error: float | None  # None: a model without partners (nothing was fused)
    removal_error: float
    relative_error: float
    updates: int = 0  # re-masks done, the final one included
    soft_partners: str | None = "regrow"  # what the partners did between re-masks (None: no partners)

    @property
    def keep_ratio(self) -> float:
        """Deprecated: ``1 - channel_ratio``."""
        warn_deprecated("SoftReport.keep_ratio", "1 - SoftReport.channel_ratio")
        return 1.0 - self.channel_ratio

    def __getitem__(self, key: str) -> Any:
        if key == "keep_ratio":
            warn_deprecated('SoftReport["keep_ratio"]', '1 - SoftReport["channel_ratio"]')
            return 1.0 - self.channel_ratio
        return asdict(self)[key]


def _check_options(
    channel_ratio: float | None, flops_reduction: float | None, soft_every: int,
    importance: str, round_to: int | None, soft_partners: str,
) -> float | None:
    """Refuse options :class:`SoftPruner` cannot use; returns ``flops_reduction`` as a float."""
    if (channel_ratio is None) == (flops_reduction is None):
        raise PruningError(
            "give exactly one of channel_ratio (fraction of channels to remove per group) or "
            "flops_reduction (e.g. 0.74 for 74% fewer MACs)"
        )
    if channel_ratio is not None and (isinstance(channel_ratio, bool)
                                      or not isinstance(channel_ratio, int | float)
                                      or not 0.0 <= channel_ratio < 1.0):
        raise PruningError(f"channel_ratio must be in [0, 1), got {channel_ratio!r}; pass e.g. "
                           "0.5 to remove half the channels")
    if flops_reduction is not None:
        flops_reduction = check_fraction(
            flops_reduction, "flops_reduction", "pass e.g. 0.74 for 74% fewer MACs"
        )
    if isinstance(soft_every, bool) or not isinstance(soft_every, int) or soft_every < 1:
        raise PruningError(f"soft_every must be a positive number of epochs, got {soft_every!r}")
    make_importance(importance)  # an unknown name: one line with the choices
    check_round_to(round_to)
    if soft_partners not in SOFT_PARTNERS:
        raise PruningError(f"soft_partners must be one of {', '.join(SOFT_PARTNERS)}, got "
                           f"{soft_partners!r}")
    return flops_reduction


def _soft_remedies(model: nn.Module, placement: Placement) -> tuple[str, str]:
    """What a soft target out of reach can change (search_ratio's ``remedies``): only the
    convs with partners (or, without partners, at ``placement``) are pruned, so giving
    every conv its groups reaches further; the hard-pruning options do not apply."""
    blocks = partner_blocks(model)
    if blocks:
        covered = {id(b.conv) for _, b in blocks} | {
            id(m) for _, b in blocks for m in b.partner_modules()}
        more = any(isinstance(m, nn.Conv2d) and id(m) not in covered for m in model.modules())
        how = (f"extend with {arg('placement', 'all')} (partners, and so soft pruning, at "
               "every conv)")
    else:
        more = placement not in ("all", None)
        how = f"pass {arg('placement', 'all')} (soft pruning at every conv)"
    unreachable = (f", or {how}; soft pruning reaches only the channels of the convs "
                   "it prunes") if more else ""
    return unreachable, f"a smaller {arg('round_to')} or another target"


class SoftPruner:
    """Soft filter pruning of an extended model (or of a plain one), usable from any
    training loop.

    Each *group* is a set of output channels that Torch-Pruning removes together and
    that contains a partner block: the block's conv and partner conv, plus, when the
    block's output meets others in a residual addition, every conv and BN feeding that
    addition (so what is zeroed is exactly what :meth:`finalize` removes). A model without
    partners (Soft Filter Pruning alone, He et al. 2018) gets the groups of the convs
    :func:`bpl.extend` would give partners, and :meth:`finalize` only removes. Groups with
    grouped (non-depthwise) convs or with layers that cannot be zeroed exactly
    (anything but Conv/Linear/BatchNorm) are left alone and logged.

    A channel is scored by ``importance``, any criterion of hard pruning
    (:func:`~bpl.pruning.importance_names`, or a Torch-Pruning importance object) over the
    whole group: ``"l2"``, the paper's choice, is the norm of its filters in all the
    group's convs and Linears together. On an
    update, the lowest ``channel_ratio`` of each group are zeroed: conv/Linear
    weights and biases and both BNs' weight, bias and running mean, so the channel's
    output is exactly 0 in train and eval mode. Gradient hooks zero the masked rows'
    gradients, and :meth:`apply` (call it after ``optimizer.step()``) re-zeroes them,
    because momentum and weight decay would otherwise revive them.

    ``soft_partners="regrow"`` (the default, the reference code's recipe) holds only the
    block's and the network's masked channels at zero: a partner's masked filters are
    zeroed at each update and regrow in between, so the network trains with more
    capacity than it deploys with. Its BNs are left alone until the end (zeroing them
    would leave nothing to regrow: see :mod:`~bpl.pruning.soft_masks`), so between
    updates a masked channel carries the partner BN's shift. ``soft_partners="masked"`` holds
    the partners' channels at exactly zero too, so zeroed filters have norm 0 and are
    picked again: masks only grow. Either way :meth:`finalize` makes a last update that
    zeroes every masked channel exactly, so the removal is exact.

    ``channel_ratio`` is the fraction of each group's channels removed, as in
    :func:`~bpl.pruning.prune`; with ``flops_reduction`` (the fraction of FLOPs to remove,
    counted as MACs) it is searched so that the model returned by :meth:`finalize` has that
    many fewer MACs than the fused unpruned model (within ``tolerance``). The masks are picked anew every ``soft_every`` epochs
    (:meth:`epoch_end`). The keywords are the config's and flags' names
    (``--soft-every``, ``--soft-partners``); ``keep_ratio`` (``1 - channel_ratio``),
    ``every`` and ``partners`` are their deprecated forms until bpl 0.3.
    ``round_to`` (8 by default; 1 or None: no rounding) keeps each group's kept count a
    multiple of it, as in :func:`~bpl.pruning.prune`, with the same fallback to half the
    ``round_to`` when the target cannot be reached with it (``self.round_to`` is the one
    used). ``placement`` (as in :func:`bpl.extend`) picks, in a model without partners,
    the convs whose groups are pruned; a model with partners has them at its blocks.
    """

    @renamed_keywords(every="soft_every", partners="soft_partners")
    def __init__(
        self,
        model: nn.Module,
        example_inputs: Inputs,
        *,
        channel_ratio: float | None = None,
        flops_reduction: float | None = None,
        soft_every: int = 1,
        importance: str | tp.importance.Importance = "l2",
        round_to: int | None = DEFAULT_ROUND_TO,
        ignored_layers: Iterable[LayerRef] | LayerRef | None = None,
        tolerance: float = 0.01,
        soft_partners: str = "regrow",
        placement: Placement = "paper",
        keep_ratio: float | None = None,
    ) -> None:
        model = unwrap_parallel(model)
        keep = None
        if keep_ratio is not None:  # the fraction kept (0.1): warn, and keep it exactly
            warn_deprecated("SoftPruner(keep_ratio=k)", "SoftPruner(channel_ratio=1 - k)",
                            stacklevel=4)  # past the keyword wrapper
            if channel_ratio is not None:
                raise PruningError("give channel_ratio only (keep_ratio is its deprecated "
                                   "complement)")
            if isinstance(keep_ratio, bool) or not 0.0 < keep_ratio <= 1.0:
                raise PruningError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
            keep, channel_ratio = float(keep_ratio), 1.0 - keep_ratio
        flops_reduction = _check_options(channel_ratio, flops_reduction, soft_every, importance,
                                         round_to, soft_partners)
        self.soft_partners = soft_partners
        self.model = model
        self.args = as_args(example_inputs)
        self.soft_every = soft_every
        self.importance = importance
        self.round_to = round_to
        self.flops_reduction = flops_reduction
        self.tolerance = tolerance
        self.updates = 0
        self._report: SoftReport | None = None
        ignored = list(dict.fromkeys(
            resolve_layers(model, ignored_layers) + find_output_layers(model, self.args)
        ))
        self.groups, self._graph = build_soft_groups(model, self.args, ignored, placement)
        self._criterion = make_importance(importance)
        if not self.groups:
            if partner_blocks(model):
                what = ("contains a partner block; soft-prune convs whose output channels can "
                        "be removed, or ignore fewer layers")
            elif placement not in ("all", None):
                what = (f"holds a conv that bpl.extend would give partners at "
                        f"{arg('placement', placement)}; pass {arg('placement', 'all')} to "
                        "root the groups at every conv, or ignore fewer layers")
            else:
                what = ("can be zeroed exactly (the log says why each was skipped: grouped "
                        "convs, normalizations other than BatchNorm); prune it hard instead "
                        "(bpl.prune, or bpl compress without --soft)")
            raise PruningError(f"no prunable channel group of {type(model).__name__} {what}")
        self._scratch = Scratch(model, self.args)
        self.macs_before = deploy_macs(self._scratch.copy(model), self._scratch.args)
        if flops_reduction is not None:
            remedies = _soft_remedies(model, placement)

            def attempt(current: int | None, last: bool) -> float:
                self.round_to = current
                return search_ratio(self._reduction_at, flops_reduction, 0.999, tolerance,
                                    remedies=remedies,
                                    knob="drop ratio")[0]

            drop = over_round_to(round_to, attempt, flops_reduction, tolerance,
                                 type(model).__name__)
            keep = 1.0 - drop
        # the fraction kept, as the masks use it (and the state holds it)
        self._keep = 1.0 - float(channel_ratio) if keep is None else keep
        self._masks = ChannelMasks(self.groups, regrow=soft_partners == "regrow")
        log.info("soft pruning %d channel groups, channel ratio %.4f, update every %d epochs",
                 len(self.groups), self.channel_ratio, soft_every)

    @property
    def channel_ratio(self) -> float:
        """The fraction of each group's channels removed (given, or searched for
        ``flops_reduction``)."""
        return 1.0 - self._keep

    @property
    def keep_ratio(self) -> float:
        """Deprecated: ``1 - channel_ratio``."""
        warn_deprecated("SoftPruner.keep_ratio", "1 - SoftPruner.channel_ratio")
        return self._keep

    every = renamed_attribute("SoftPruner", "every", "soft_every")
    partners = renamed_attribute("SoftPruner", "partners", "soft_partners")

    @property
    def report(self) -> SoftReport | None:
        """Deprecated: ``bpl.reports(deployed)["soft"]`` of the model :meth:`finalize`
        returned (None before it ran)."""
        warn_deprecated("SoftPruner.report", 'bpl.reports(deployed)["soft"]')
        return self._report

    def _reduction_at(self, drop: float) -> float:
        """MAC reduction of the fused model after removing ``drop`` of every group's channels."""
        trial = self._scratch.copy(self.model)
        dg = dependency_graph(trial, self._scratch.args)
        for group in self.groups:
            n_drop = group.size - keep_count(group.size, 1.0 - drop, self.round_to)
            if n_drop:
                root = trial.get_submodule(group.name)
                dg.get_pruning_group(root, tp.prune_conv_out_channels, list(range(n_drop))).prune()
        return 1.0 - deploy_macs(trial, self._scratch.args) / self.macs_before

    # -- during training

    def apply(self) -> None:
        """Re-zero every masked channel (cheap; call it after each ``optimizer.step()``)."""
        self._masks.apply()

    def after_step(self) -> None:
        """Training-loop hook name for :meth:`apply` (bpl's engine calls it after each step)."""
        self.apply()

    def scores(self) -> dict[str, torch.Tensor]:
        """Current importance of each group's channels (keyed by the root conv's name), by the
        criterion's own Torch-Pruning importance over the whole group: the channel's filters
        in the block, its partner and every conv coupled with them (as hard pruning scores)."""
        out = {}
        for group in self.groups:
            coupled = self._graph.get_pruning_group(group.root, tp.prune_conv_out_channels,
                                                    list(range(group.size)))
            score = self._criterion(coupled)
            out[group.name] = (torch.zeros(group.size) if score is None
                               else score.detach().float().cpu())
        return out

    def update(self, final: bool = False) -> None:
        """Pick the lowest-scoring channels of every group anew and zero them (``final``:
        regrowing partners' BNs too, so every masked channel is exactly 0)."""
        scores = self.scores()
        for group in self.groups:
            n_drop = group.size - keep_count(group.size, self._keep, self.round_to)
            keep = torch.ones(group.size, dtype=torch.bool)
            keep[torch.argsort(scores[group.name], stable=True)[:n_drop]] = False
            group.keep = keep
        self.updates += 1
        self._masks.rebuild()
        self._masks.zero_all(final=final)
        log.info("soft pruning update %d: %d of %d channels zeroed", self.updates,
                 sum(int((~g.keep).sum()) for g in self.groups), sum(g.size for g in self.groups))

    def epoch_end(self, epoch: int) -> bool:
        """Call after each epoch (0-based); updates the masks every ``soft_every`` epochs."""
        if (epoch + 1) % self.soft_every:
            return False
        self.update()
        return True

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Keep masks (True = kept) over each group's root-conv channels."""
        return {g.name: g.keep.clone() for g in self.groups}

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the masks stay as they are)."""
        self._masks.remove_hooks()

    # -- state

    def state_dict(self) -> dict[str, Any]:
        """Masks and schedule state, to save with a training checkpoint (the keys of 0.1:
        ``keep_ratio`` is the fraction kept)."""
        return {
            "keep_ratio": self._keep,
            "round_to": self.round_to,
            "every": self.soft_every,
            "partners": self.soft_partners,
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
        self._keep = float(state.get("keep_ratio", self._keep))
        self.round_to = state.get("round_to", self.round_to)
        self.soft_every = int(state.get("every", self.soft_every))
        self.updates = int(state.get("updates", self.updates))
        partners = state.get("partners", "masked")  # states before "regrow" held partners too
        if partners != self.soft_partners:
            self._masks.remove_hooks()
            self._masks = ChannelMasks(self.groups, regrow=partners == "regrow")
            self.soft_partners = partners
        self._masks.rebuild()
        self.apply()

    # -- the end

    @renamed_keywords(tol="verify_tol")
    def finalize(
        self,
        model: nn.Module | None = None,
        example_inputs: Inputs | None = None,
        *,
        verify_tol: float = 1e-5,
    ) -> nn.Module:
        """Fuse the partners (if any), then physically remove exactly the zeroed channels.

        Makes a last :meth:`update` first. Returns a new, smaller model with the
        architecture of the un-extended model (``model``, if given, must be the model
        the pruner was built on). It is checked in eval mode on ``example_inputs``
        (default: those given at construction) against the masked extended model:
        relative error <= ``verify_tol``, else :class:`~bpl.errors.VerificationError`.
        ``bpl.reports(result)["soft"]`` (a :class:`SoftReport`) has the MACs before and
        after, the reduction, and the errors of the fusion (``fusion_error``), of the
        removal (``removal_error``) and of both (``relative_error``).
        """
        if model is not None:
            model = unwrap_parallel(model)
            if model is not self.model:
                raise PruningError("finalize() got a different model than the pruner was built on")
        model = self.model
        device = next(model.parameters()).device
        check = as_args(example_inputs) if example_inputs is not None else self.args
        check = tuple(a.to(device) for a in check)
        self.update(final=True)
        was_training = model.training
        deploy = copy.deepcopy(model).eval()
        partnered = bool(partner_blocks(deploy))
        fusion_error = None
        if partnered:
            fuse(deploy, inplace=True)
            fusion_error = verify(model, deploy, *check, verify_tol=verify_tol)
        with torch.no_grad():
            fused_out = deploy(*check)
        dg = dependency_graph(deploy, check)
        for group in self.groups:
            dropped = (~group.keep).nonzero().flatten().tolist()
            if dropped:
                root = deploy.get_submodule(group.deploy_name)
                dg.get_pruning_group(root, tp.prune_conv_out_channels, dropped).prune()
        with torch.no_grad():
            removal_error = max_relative_error(fused_out, deploy(*check))
        err = verify(model, deploy, *check, verify_tol=verify_tol)
        deploy.train(was_training)
        macs_after = deploy_macs(self._scratch.copy(deploy), self._scratch.args)
        reduction = 1.0 - macs_after / self.macs_before
        self._report = SoftReport(
            macs_before=self.macs_before,
            macs_after=macs_after,
            reduction=reduction,
            target=self.flops_reduction,
            channel_ratio=self.channel_ratio,
            fusion_error=fusion_error,
            removal_error=removal_error,
            relative_error=err,
            updates=self.updates,
            soft_partners=self.soft_partners if partnered else None,
        )
        record_report(deploy, "soft", self._report)
        log.info("soft pruning finalized: MACs %d -> %d (%.2f%% fewer), relative error %.2g",
                 self.macs_before, macs_after, 100 * reduction, err)
        if self.flops_reduction is not None and abs(reduction - self.flops_reduction) > self.tolerance:
            log.warning("MAC reduction %.2f%% is off the target %.2f%%",
                        100 * reduction, 100 * self.flops_reduction)
        return deploy
