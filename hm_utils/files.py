"""Atomic file writes shared by every stage: readers never see a half-written file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

# errno values of a full file system or an exhausted disk quota.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` through a temporary sibling file and ``os.replace``.

    Parent folders are created. On any error the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file with mode 0600; give it the mode a plain open() would.
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, payload: Any, indent: int = 2, default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``payload`` as UTF-8 JSON (``ensure_ascii=False``) atomically.

    Raises ``ValueError`` for NaN or infinity, which JSON cannot represent.
    """
    text = json.dumps(payload, ensure_ascii=False, indent=indent, allow_nan=False, default=default)
    return write_text_atomic(path, text + "\n")


@contextlib.contextmanager
def explain_disk_full(path: str | Path) -> Iterator[None]:
    """Re-raise a full-disk ``OSError`` from the block as a one-line ``OSError`` that names ``path`` and the fix.

    Other errors pass through unchanged. The caller still removes what it wrote; this only
    rewords the error, because the default message names no path.
    """
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        raise OSError(
            error.errno,
            f"no space left while writing {path} ({os.strerror(error.errno)}); free space on that file system"
            " or choose another output folder",
        ) from error
