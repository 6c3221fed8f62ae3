"""Model factory and checkpoints that rebuild pruned (and extended) models without pickled code.

:func:`build_model` makes a torchvision classification model, or one of the tiny CNNs
of :mod:`.zoo` for tests and demos, by name. :func:`save_model` writes the state_dict
together with the architecture name and the width of every Conv2d / BatchNorm /
Linear, so :func:`load_model` can rebuild the stock architecture, swap in modules of
the recorded widths, re-extend the convs that had partners, and load the weights with
``strict=True`` from a ``torch.load(weights_only=True)`` file.
"""

from ..errors import CheckpointError
from ..files import atomic_save
from .checkpoints import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    load_model,
    model_from_payload,
    model_payload,
    read_state_dict,
    save_model,
)
from .factory import baseline_from_weights, build_model, reinitialize, replace_classifier
from .zoo import TinyResNet, TinyVGG, list_models

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "TinyResNet",
    "TinyVGG",
    "atomic_save",
    "baseline_from_weights",
    "build_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_from_payload",
    "model_payload",
    "read_state_dict",
    "reinitialize",
    "replace_classifier",
    "save_model",
]

