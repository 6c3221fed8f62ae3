"""Knowledge distillation from the unpruned baseline: an extra loss term, like the diversity loss.

The standard recovery after pruning (Hinton et al. 2015; NVIDIA ModelOpt, Intel Neural
Compressor and NNCF all offer it): the pruned student also matches the softened class
probabilities of its own unpruned teacher. In a loop of your own::

    loss = criterion(logits, y) + bpl.distillation_loss(logits, teacher(x), T, distill_weight=w)

and inside ``bpl compress`` (``--distill``) the same term through :class:`Distillation`.
Both take the weight, as :func:`~bpl.diversity_loss` and :class:`~bpl.diversity.Diversity`
do; the keywords are the flags' names (``--distill-temperature``, ``--distill-weight``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from .deprecation import renamed_attribute, renamed_keywords
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .engine import Step

__all__ = ["Distillation", "distillation_loss"]


def _check_options(distill_temperature: float, distill_weight: float) -> None:
    if not (distill_temperature > 0 and distill_weight >= 0):
        raise InvalidArgumentError(
            "distill_temperature must be positive and distill_weight 0 or more, got "
            f"{distill_temperature}, {distill_weight}"
        )


@renamed_keywords(temperature="distill_temperature")
def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, distill_temperature: float = 4.0,
    *, distill_weight: float = 1.0,
) -> torch.Tensor:
    """``distill_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged
    over the batch, ``T`` the ``distill_temperature``.

    The ``T^2`` keeps the gradient's size independent of the temperature (Hinton et al.).
    Computed in float32 whatever the logits' dtype (AMP gives float16 logits).
    ``temperature=`` is the deprecated name of ``distill_temperature`` (until bpl 0.3).
    """
    _check_options(distill_temperature, distill_weight)
    t = distill_temperature
    log_p_student = torch.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = torch.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = nn.functional.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return distill_weight * (kl * (t * t))


class Distillation:
    """The distillation loss term of a training step, with a frozen teacher.

    The teacher is a private copy, always in eval mode (BatchNorm uses its running
    statistics), with no gradient; it moves to the inputs' device (and memory format) on
    first use and runs under the step's autocast, so it follows AMP. Under torchrun each process runs its own
    copy on its own share of the batch, so nothing is synchronised.
    """

    @renamed_keywords(temperature="distill_temperature", weight="distill_weight")
    def __init__(self, teacher: nn.Module, *, distill_temperature: float = 4.0,
                 distill_weight: float = 1.0):
        _check_options(distill_temperature, distill_weight)
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.distill_temperature, self.distill_weight = distill_temperature, distill_weight

    temperature = renamed_attribute("Distillation", "temperature", "distill_temperature")
    weight = renamed_attribute("Distillation", "weight", "distill_weight")

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for ``inputs`` (moved to their device, eval mode, no grad)."""
        p = next(self.teacher.parameters())
        if p.device != inputs.device:
            self.teacher.to(inputs.device)
        if (inputs.dim() == 4 and inputs.shape[1] > 1 and not inputs.is_contiguous()
                and inputs.is_contiguous(memory_format=torch.channels_last)):
            self.teacher.to(memory_format=torch.channels_last)  # as the student runs
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(inputs)

    def __call__(self, step: Step) -> torch.Tensor:
        with step.autocast():
            teacher = self.teacher_logits(step.inputs)
        return distillation_loss(step.logits, teacher, self.distill_temperature,
                                 distill_weight=self.distill_weight)
