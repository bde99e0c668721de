"""The dataset fingerprint: the one definition of "the same dataset" (what a cached full check
is keyed by).

Cheap and stable: per split, the sorted names of every image and label with their sizes and
modification times (ns), hashed. It changes when a file is added, removed, renamed, rewritten
or touched; it does not read file contents, so a file changed in place with its size and
mtime restored keeps the fingerprint.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .ade20k import SPLITS, dataset_dir


def dataset_fingerprint(root: str | Path) -> str:
    """Hex SHA-256 over (split, kind, name, size, mtime_ns) of every file of every split."""
    base = dataset_dir(root)
    h = hashlib.sha256()
    for split in SPLITS:
        for kind in ("images", "annotations"):
            d = base / kind / split
            entries = sorted(os.scandir(d), key=lambda e: e.name) if d.is_dir() else []
            h.update(f"{split}/{kind}:{len(entries)}\n".encode())
            for e in entries:
                st = e.stat()
                h.update(f"{e.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
