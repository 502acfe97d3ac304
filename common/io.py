"""Small file helpers both sides use: private atomic writes and JSON-safe values.

Everything written through :func:`atomic_write` is readable by its owner only (files 0o600,
folders :func:`private_dir` creates 0o700): run folders hold per-site metrics of hospitals and a
site's folder holds its pseudo-labels, so nobody else on a shared machine needs to read them.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: Mode of every file :func:`atomic_write` writes, and of the folders :func:`private_dir` makes.
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents with mode 0o700 (whatever the umask); a folder that
    already exists keeps its mode. Returns ``path``."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:  # made meanwhile by another process
            continue
        os.chmod(folder, PRIVATE_DIR)
    return path


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write ``path`` through ``write(tmp)`` on a temp file in the same folder, then rename: a crash
    never leaves a half-written file. The file ends up with mode 0o600 (owner only); a missing
    folder is made with :func:`private_dir`."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, PRIVATE_FILE)  # whatever `write` did to the file (mkstemp makes it 0o600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON null); nested dicts/lists handled; tensors/np scalars -> float."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None
