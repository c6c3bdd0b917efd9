"""Atomic file writes shared by every stage: readers never see a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` through a temporary sibling file and ``os.replace``.

    Parent folders are created. On any error the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
