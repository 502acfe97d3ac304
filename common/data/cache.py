"""A site's cache: each case validated and preprocessed once, not once per message.

Flower starts a new ClientApp process for every message, so without a cache every round re-reads
every voxel of every NIfTI to validate it and re-runs the whole preprocessing (load, reorient,
crop, resample, normalise). Both results are kept in the site's state folder (it never leaves the
site), keyed by a **fingerprint** of the case's files: resolved path, size and modification time,
or, with ``data.cache_content_hash``, a SHA-256 of their bytes. A changed, added or removed case
therefore invalidates only that case; whatever the code version or preprocessing config, a
stale entry is never used (the key includes them); a damaged entry is rebuilt, never trusted.

* validation (:class:`ValidationCache`): what :func:`common.data.site.validate_case_files` found,
  per case, in ``<state>/cache/validation.json``; the key includes the bytes of ``site.py``
  itself, so a new check re-validates everything;
* preprocessing (:class:`PersistentCases`): MONAI's ``PersistentDataset`` over the deterministic
  part of the pipeline (one ``.pt`` file per case and preprocessing), loaded with
  ``weights_only=True``; the key includes the preprocessing settings (``preprocessing``: the output
  size) and the bytes of ``transforms.py``, because MONAI's own transform hash falls back to the
  transforms' class names when they are not JSON-serialisable (all of ours), so an entry
  preprocessed at another ``data.size`` would otherwise be reused. Labels and the case's position are not part of an entry: they are set
  from the current ``labels.csv`` on every read, so a label edit needs no rebuild.

MONAI's PersistentDataset deletes only some kinds of damaged files (a truncated zip raises), and
Flower has no per-site cache, hence the small additions here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import PersistentDataset
from monai.data.utils import json_hashing

from common.data import site as site_module
from common.data import transforms as transforms_module
from common.data.site import Category, Problem, SegContent, validate_case_files
from common.io import atomic_write

CACHE_DIR = "cache"
VALIDATION_FILE = "validation.json"
PREPROCESSED_DIR = "preprocessed"

log = logging.getLogger(__name__)
_CODE = hashlib.sha256(Path(site_module.__file__).read_bytes()).hexdigest()[:16]
_TRANSFORMS_CODE = hashlib.sha256(Path(transforms_module.__file__).read_bytes()).hexdigest()[:16]


def file_fingerprint(path: Path, content_hash: bool = False) -> list[Any]:
    """``[resolved path, size, mtime_ns]`` of ``path``, plus the SHA-256 of its bytes on request."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    out: list[Any] = [str(resolved), stat.st_size, stat.st_mtime_ns]
    if content_hash:
        digest = hashlib.sha256()
        with resolved.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out.append(digest.hexdigest())
    return out


def case_fingerprint(images: Mapping[str, Path], seg: Path | None, content_hash: bool = False, **extra: Any) -> str:
    """One key for a case's files (and ``extra`` settings that change what is computed from them)."""
    files = {key: file_fingerprint(path, content_hash) for key, path in sorted(images.items())}
    if seg is not None:
        files["seg"] = file_fingerprint(seg, content_hash)
    text = json.dumps({"files": files, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ValidationCache:
    """Per-case results of :func:`validate_case_files`, reused while the fingerprint matches.

    Use as ``scan_site(..., validation_cache=cache)``; :meth:`save` writes what was (re)computed.
    """

    def __init__(self, folder: Path, *, content_hash: bool = False) -> None:
        self.path = Path(folder) / VALIDATION_FILE
        self.content_hash = content_hash
        self.entries: dict[str, dict[str, Any]] = {}
        self.hits = self.misses = 0
        if self.path.is_file():
            try:
                entries = json.loads(self.path.read_text())
                if not isinstance(entries, dict):
                    raise ValueError("not an object")
                self.entries = entries
            except (OSError, ValueError) as exc:
                log.warning("the site's validation cache %s is damaged (%s); validating every case again", self.path, exc)

    def validate(
        self, case_id: str, images: Mapping[str, Path], seg: Path | None, *, deep: bool, max_voxels: int
    ) -> tuple[list[Problem], SegContent | None]:
        """Cached :func:`validate_case_files` of one case."""
        try:
            key = case_fingerprint(images, seg, self.content_hash, deep=deep, max_voxels=max_voxels, code=_CODE)
        except OSError:  # unreadable: let the validation say so, uncached
            return validate_case_files(images, seg, deep=deep, max_voxels=max_voxels)
        entry = self.entries.get(case_id)
        if isinstance(entry, dict) and entry.get("key") == key:
            try:
                result = _decode(entry)
                self.hits += 1
                return result
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("validation cache entry of a case is damaged (%s); validating it again", exc)
        self.misses += 1
        problems, content = validate_case_files(images, seg, deep=deep, max_voxels=max_voxels)
        self.entries[case_id] = {"key": key, **_encode(problems, content)}
        return problems, content

    def save(self, keep: set[str] | None = None) -> None:
        """Write the cache (only the cases in ``keep`` when given: removed cases are dropped)."""
        if keep is not None:
            self.entries = {k: v for k, v in self.entries.items() if k in keep}
        text = json.dumps(self.entries)
        try:
            atomic_write(self.path, lambda tmp: tmp.write_text(text))
        except OSError as exc:  # a read-only state folder costs speed, not correctness
            log.warning("cannot write the site's validation cache %s (%s)", self.path, exc)


def _encode(problems: list[Problem], content: SegContent | None) -> dict[str, Any]:
    return {
        "problems": [{"path": str(p.path), "reason": p.reason, "fix": p.fix, "category": str(p.category)} for p in problems],
        "content": None if content is None else {"counts": {str(k): int(v) for k, v in content.counts.items()},
                                                 "voxel_ml": float(content.voxel_ml)},
    }


def _decode(entry: Mapping[str, Any]) -> tuple[list[Problem], SegContent | None]:
    problems = [Problem(Path(p["path"]), str(p["reason"]), str(p["fix"]), Category(p["category"])) for p in entry["problems"]]
    raw = entry["content"]
    content = None if raw is None else SegContent({int(k): int(v) for k, v in raw["counts"].items()}, float(raw["voxel_ml"]))
    return problems, content


class PersistentCases(PersistentDataset):
    """MONAI's PersistentDataset keyed by file fingerprints (not by paths alone), and rebuilding
    any entry that cannot be loaded. ``labels``/``index`` of an item are excluded from the key and
    overwritten from the item on every read (see the module docstring)."""

    def __init__(self, items: list[dict[str, Any]], transform: Any, cache_dir: Path, *,
                 preprocessing: Mapping[str, Any], content_hash: bool = False, volatile: tuple[str, ...] = ()) -> None:
        """``preprocessing``: the settings the deterministic part of ``transform`` depends on (JSON
        scalars, e.g. ``{"size": 32}``); part of every entry's key with the transforms' code."""
        self.content_hash = content_hash
        self.volatile = volatile
        self.preprocessing = {**preprocessing, "code": _TRANSFORMS_CODE}
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(items, transform, cache_dir=cache_dir, hash_func=self._key, hash_transform=json_hashing)

    def _key(self, item: Mapping[str, Any]) -> bytes:
        files = {k: file_fingerprint(Path(v), self.content_hash) for k, v in sorted(item.items())
                 if isinstance(v, str) and k not in self.volatile and Path(v).suffix in (".nii", ".gz")}
        rest = {k: v for k, v in sorted(item.items()) if k not in files and k not in self.volatile
                and isinstance(v, (str, int, float))}
        key = {"files": files, "rest": rest, "preprocessing": self.preprocessing}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest().encode()

    def _cachecheck(self, item_transformed: Any) -> Any:
        hashfile = Path(self.cache_dir) / f"{self.hash_func(item_transformed).decode()}{self.transform_hash}.pt"
        if hashfile.is_file():
            try:
                cached = torch.load(hashfile, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unreadable entry is rebuilt, never trusted
                log.warning("damaged preprocessing cache entry %s (%s); rebuilding it", hashfile.name, type(exc).__name__)
                hashfile.unlink(missing_ok=True)
            else:
                return _overwrite(cached, item_transformed, self.volatile)
        return _overwrite(super()._cachecheck(item_transformed), item_transformed, self.volatile)


def _overwrite(cached: dict[str, Any], item: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``cached`` with the current values of ``keys`` (labels, position) from ``item``."""
    out = dict(cached)
    for key in keys:
        if key in item:
            out[key] = torch.as_tensor(np.asarray(item[key]))
    return out


def site_cache_dir(state_dir: Path, enabled: bool = True) -> Path | None:
    """``<state folder>/cache`` (validation results), or None when ``data.site_cache`` is off."""
    return Path(state_dir) / CACHE_DIR if enabled else None


def preprocessed_dir(state_dir: Path, enabled: bool = True) -> Path | None:
    """``<state folder>/cache/preprocessed`` (preprocessed cases), or None when the cache is off."""
    root = site_cache_dir(state_dir, enabled)
    return None if root is None else root / PREPROCESSED_DIR
