"""The command's own words in messages written for the Python API.

Library errors tell a Python caller what to pass (``root=``, ``skip_bad=True``,
``name='imagefolder'``); the `bpl` command says the same with its flags
(``--data-root``, ``--skip-bad``, ``--data imagefolder``). One table, used for the
errors the command prints and for the warnings it logs.
"""

from __future__ import annotations

import logging
import re

__all__ = ["FlagWording", "in_flags"]

#: Python keyword -> the flag that sets it (``None``: a value-specific rewrite below).
_FLAGS = {
    "root": "--data-root",
    "name": "--data",
    "skip_bad": "--skip-bad",
    "download": "--download",
    "cache": "--cache",
    "cache_dir": "--cache-dir",
    "cache_budget": "--cache-budget",
    "accept_closest": "--accept-closest",
    "round_to": "--round-to",
    "image_size": "--image-size",
    "train_ratio": "--train-ratio",
    "val_ratio": "--val-ratio",
    "train_subset": "--train-subset",
    "flops_reduction": "--flops-reduction",
    "global_pruning": "--global-pruning",
    "importance": "--importance",
    "num_classes": "the number of class folders",
    "max_drop": "--max-drop",
    "speedup": "--speedup",
    "runtime": "--runtime",
    "min_calibration": "--calibration-images",
}
_SPECIAL = {
    "kernel_sizes=None": "--placement all",
    "point root at": "point --data-root at",
    "a smaller round_to": "a smaller --round-to",
    "max_drop=None": "--force",
    "pass validation= labelled images": "pass --split with the run's split.json",
}
_KEYWORD = re.compile(
    r"\b(" + "|".join(map(re.escape, _FLAGS)) + r")=(True\b|'[^']*'|\"[^\"]*\"|[\w.-]+)?"
)
_SUBJECT = re.compile(r"\b(" + "|".join(map(re.escape, _FLAGS)) + r")(?= must\b)")


def _keyword(match: re.Match) -> str:
    flag, value = _FLAGS[match.group(1)], match.group(2)
    if value is None or value == "True":
        return flag
    return f"{flag} {value.strip(chr(39) + chr(34))}"


def in_flags(message: str) -> str:
    """``message`` with Python keyword arguments replaced by the CLI flags that set them."""
    for python, flag in _SPECIAL.items():
        message = message.replace(python, flag)
    message = _KEYWORD.sub(_keyword, message)
    return _SUBJECT.sub(lambda m: _FLAGS[m.group(1)], message)


class FlagWording(logging.Filter):
    """A logging filter that rewrites each record's message in the command's flags."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = in_flags(record.getMessage())
        record.args = ()
        return True
