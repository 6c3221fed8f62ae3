"""Exceptions raised by bpl; each message names the problem and how to fix it."""


class BPLError(Exception):
    """Base class for every error bpl raises on purpose (the CLI prints these as one line)."""


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

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class ChecksumError(DataError):
    """A downloaded file does not have the expected size or checksum."""


class CheckpointError(BPLError):
    """A checkpoint that cannot be read or does not fit the architecture it names."""


class PruningError(BPLError):
    """A pruning request that cannot be carried out as asked."""


class TrainingDiverged(BPLError):
    """The loss became NaN or infinite."""
