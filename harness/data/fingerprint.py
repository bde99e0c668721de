"""Dataset identity: the one definition of "the same data".

Two fingerprints, for two questions:
- ``dataset_fingerprint(root)``: has anything in the tree changed since it was last looked at?
  Names, sizes and modification times (ns) of every file of every split, hashed; no file is
  read. It keys caches (the full data check, and the content fingerprints below).
- ``split_fingerprint(root, split)``: is this the same data as a run used? Names, sizes and a
  sampled content hash of one split's images and labels; no modification times, so a copy of
  the dataset elsewhere is the same data and a file rewritten with other content is not. A
  result is keyed by it (harness/identity.py). Computed once per tree state and cached.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from harness.atomic import write_json

from .ade20k import SPLITS, dataset_dir

CACHE_ENV = "SEGREPRO_CACHE"
FINGERPRINT_CACHE = "fingerprints-1"  # bump when split_fingerprint's definition changes
# How many files' content is sampled per split and how much of each: the head and the tail of
# a JPEG/PNG differ between any two real images, and 64 files x 8 KiB reads in milliseconds.
SAMPLED_FILES = 64
SAMPLED_BYTES = 4096


def cache_dir() -> Path:
    """``$SEGREPRO_CACHE``, else ``$XDG_CACHE_HOME/segrepro``, else ``~/.cache/segrepro``:
    never the dataset, which may be read-only."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "segrepro"


def _entries(base: Path, split: str, kind: str) -> list[os.DirEntry]:
    d = base / kind / split
    return sorted(os.scandir(d), key=lambda e: e.name) if d.is_dir() else []


def _stat_hash(base: Path, splits) -> str:
    h = hashlib.sha256()
    for split in splits:
        for kind in ("images", "annotations"):
            entries = _entries(base, split, kind)
            h.update(f"{split}/{kind}:{len(entries)}\n".encode())
            for e in entries:
                st = e.stat()
                h.update(f"{e.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def dataset_fingerprint(root: str | Path) -> str:
    """Hex SHA-256 over (split, kind, name, size, mtime_ns) of every file of every split."""
    return _stat_hash(dataset_dir(root), SPLITS)


def _content_fingerprint(base: Path, split: str) -> dict:
    h = hashlib.sha256()
    files = total = 0
    for kind in ("images", "annotations"):
        entries = _entries(base, split, kind)
        files += len(entries)
        h.update(f"{kind}:{len(entries)}\n".encode())
        sizes = []
        for e in entries:
            size = e.stat().st_size
            sizes.append(size)
            h.update(f"{e.name}\t{size}\n".encode())
        total += sum(sizes)
        step = max(1, len(entries) // SAMPLED_FILES)
        for e, size in list(zip(entries, sizes))[::step][:SAMPLED_FILES]:
            with open(e.path, "rb") as f:
                h.update(f.read(SAMPLED_BYTES))
                if size > SAMPLED_BYTES:
                    f.seek(max(SAMPLED_BYTES, size - SAMPLED_BYTES))
                    h.update(f.read(SAMPLED_BYTES))
    images = len(_entries(base, split, "images"))
    return {"split": split, "fingerprint": h.hexdigest()[:16], "images": images, "files": files, "bytes": total}


def split_fingerprint(root: str | Path, split: str) -> dict:
    """``{"split", "fingerprint" (16 hex), "images", "files", "bytes"}`` of one split, from the
    cache when the tree's names, sizes and mtimes are those it was computed on."""
    base = dataset_dir(root)
    path = cache_dir() / FINGERPRINT_CACHE / f"{_stat_hash(base, (split,))}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    record = _content_fingerprint(base, split)
    try:
        write_json(path, record)
    except OSError:  # an unwritable cache costs a recomputation next time, nothing else
        pass
    return record
