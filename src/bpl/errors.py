"""Exceptions raised by bpl; each message names the problem and how to fix it.

A message names the parameters it is about with :func:`arg`: ``flops_reduction`` or
``accept_closest=True`` to a Python caller, the flag that sets it (``--flops-reduction``,
``--accept-closest``) while the command line's :func:`wording` is in force. The error also
carries the parameter at fault as ``error.param``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["NOTHING", "arg", "wording"]

#: ``arg(name)`` without a value: the parameter itself, not a value to pass.
NOTHING: Any = type("Nothing", (), {"__repr__": lambda self: "NOTHING"})()

#: How the caller says a parameter (name, value) -> words, or None for the Python wording.
Wording = Callable[[str, Any], "str | None"]
_wording: Wording | None = None


def arg(name: str, value: Any = NOTHING) -> str:
    """The words for parameter ``name`` (given ``value``) in a message or log line: Python's
    ``name`` / ``name=value``, or the command line's flag under :func:`wording`."""
    if _wording is not None:
        words = _wording(name, value)
        if words is not None:
            return words
    return name if value is NOTHING else f"{name}={value!r}"


@contextmanager
def wording(words: Wording) -> Iterator[None]:
    """Name parameters with ``words`` (the CLI: its flags) in messages made inside."""
    global _wording
    previous, _wording = _wording, words
    try:
        yield
    finally:
        _wording = previous


class BPLError(Exception):
    """Base class for every error bpl raises on purpose (the CLI prints these as one line).

    ``param``: the parameter whose value is at fault, where one is (``None`` otherwise).
    """

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TraceError(BPLError):
    """A model could not be traced with torch.fx, so its conv->BN pairs cannot be found."""


class VerificationError(BPLError):
    """Two models that should compute the same function do not (error above tolerance)."""


class InvalidArgumentError(BPLError, ValueError):
    """An argument of a bpl function has a value it does not accept (also a ``ValueError``)."""


class DataError(BPLError):
    """A dataset folder, split file or download is not usable; the message says how to fix it."""


class CorruptImageError(DataError):
    """An image file could not be decoded (``reason``: the decoder's complaint, short)."""

    def __init__(self, message: str, reason: str = "", *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.reason = reason or message


class ChecksumError(DataError):
    """A downloaded file does not have the expected size or checksum."""


class CheckpointError(BPLError):
    """A checkpoint that cannot be read or does not fit the architecture it names."""


class PruningError(BPLError):
    """A pruning request that cannot be carried out as asked."""


class TrainingDiverged(BPLError):
    """The loss became NaN or infinite."""
