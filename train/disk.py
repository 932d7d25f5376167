"""Output that cannot be written: a one-line UserError naming the path, found before training when it can be.

A full disk or a read-only mount is the user's environment, not a bug: it must read like any other bad
input (exit 2, one line), and the atomic writers (artifacts.atomic) already leave nothing half-published.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from lm.errors import ConfigError, UserError

# errno values that describe the destination, not the program: they become one line, never a traceback.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EFBIG}
# Writers that wrap the OSError in their own exception type (torch.save, safetensors) keep only its text.
DISK_FULL_TEXT = {"No space left on device": "No space left on device", "Disk quota exceeded": "Disk quota exceeded",
                  "os error 28": "No space left on device",  # safetensors' Rust io::Error
                  "PytorchStreamWriter failed writing": "write failed (is the disk full?)"}  # torch.save


class OutputError(UserError):
    """The output (run directory or registry) cannot be written."""


def check_writable(path: Path | str, what: str) -> None:
    """Refuse, before anything is trained, an output whose nearest existing ancestor is not a writable folder."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{path}: {what} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{path}: {what} is not writable ({existing}: permission denied)")


def _reason(e: BaseException) -> str | None:
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return e.strerror or os.strerror(e.errno)
    text = str(e)
    return next((reason for t, reason in DISK_FULL_TEXT.items() if t in text), None)


@contextlib.contextmanager
def writing(where: Path | str, note: str = "") -> Iterator[None]:
    """Turn a full disk or a refused write under `where` into an OutputError naming the file (or `where`)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001  (safetensors raises a bare Exception subclass; others re-raise as they were)
        reason = None if isinstance(e, UserError) else _reason(e)
        if reason is None:
            raise
        path = getattr(e, "filename", None) or where
        raise OutputError(f"{path}: {reason}{note}") from None
