"""Old public names that keep working for one release, with a ``DeprecationWarning``.

Every rename of CHANGELOG.md's "Renamed" list goes through here, so the warnings read
alike and name the release that removes the old form.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import InvalidArgumentError

__all__ = ["REMOVED_IN", "renamed_attribute", "renamed_keywords", "warn_deprecated"]

#: The release in which the old names go.
REMOVED_IN = "0.3"

F = TypeVar("F", bound=Callable[..., Any])


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (``stacklevel`` 3: the caller of
    the function that calls this)."""
    warnings.warn(f"{old} is deprecated and goes in bpl {REMOVED_IN}: use {new}",
                  DeprecationWarning, stacklevel=stacklevel)


def renamed_keywords(**renamed: str) -> Callable[[F], F]:
    """Let a function (or ``__init__``) take each keyword ``old=`` under its new name, with a
    warning: ``@renamed_keywords(share="partner_share")``. Giving both is an error."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise InvalidArgumentError(
                            f"give {new}= only ({old}= is its deprecated name)")
                    warn_deprecated(f"{fn.__qualname__.replace('.__init__', '')}({old}=)",
                                    f"{new}=")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap



def renamed_attribute(owner: str, old: str, new: str) -> property:
    """A read-only property ``old`` that warns and reads ``new``:
    ``every = renamed_attribute("SoftPruner", "every", "soft_every")`` in the class body."""

    def get(self: Any) -> Any:
        warn_deprecated(f"{owner}.{old}", f"{owner}.{new}")
        return getattr(self, new)

    return property(get, doc=f"Deprecated: :attr:`{new}` (goes in bpl {REMOVED_IN}).")
