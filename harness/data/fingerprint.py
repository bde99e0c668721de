"""Dataset identity: the one definition of "the same data".

Two fingerprints, for two questions:
- ``dataset_fingerprint(root)``: has anything in the tree changed since it was last looked at?
  Names, sizes and modification times (ns) of every file of every split, hashed; no file is
  read. It keys caches (the full data check, and the content fingerprints below).
- ``split_fingerprint(root, split)``: is this the same data as a run used? Names, sizes and a
  sampled content hash of one split's images and labels; no modification times, so a copy of
  the dataset elsewhere is the same data and a file rewritten with other content is not. A
  result is keyed by it (harness/identity.py). Computed once per tree state and cached.

And one for "is this the real ADE20K validation split?" (``val_data``), which decides whether a
figure may be compared with a documented ADE20K one. What can be checked without a copy of the
real data: the names and the count always (the official split is ADE_val_00000001 ..
ADE_val_00002000, .jpg images with same-named .png labels); the content only through the
record ``segrepro data download`` writes when it extracts the SHA-1-verified official archive
(``write_download_record``: the archive's SHA-1 and the validation split's fingerprint then).
A tree written by ``segrepro data synth`` carries its marker file and is generated, whatever
its names.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from harness.atomic import write_json
from harness.contract import VAL_ADE20K, VAL_GENERATED, VAL_OTHER, VAL_UNVERIFIED

from .ade20k import SPLIT_PREFIX, SPLITS, dataset_dir
from .synth import METADATA_FILE as SYNTH_MARKER

CACHE_ENV = "SEGREPRO_CACHE"
FINGERPRINT_CACHE = "fingerprints-1"  # bump when split_fingerprint's definition changes
# How many files' content is sampled per split and how much of each: the head and the tail of
# a JPEG/PNG differ between any two real images, and 64 files x 8 KiB reads in milliseconds.
SAMPLED_FILES = 64
SAMPLED_BYTES = 4096
DOWNLOAD_RECORD = "segrepro_download.json"  # beside images/ and annotations/, written at extraction
# The official ADEChallengeData2016 validation split: ADE_val_00000001 .. ADE_val_00002000.
ADE20K_VAL_IMAGES = 2000


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


def _official_val_names() -> tuple[list[str], list[str]]:
    stems = [f"{SPLIT_PREFIX['validation']}{i:08d}" for i in range(1, ADE20K_VAL_IMAGES + 1)]
    return [s + ".jpg" for s in stems], [s + ".png" for s in stems]


def write_download_record(dataset: str | Path, archive_sha1: str, url: str) -> None:
    """Record, inside a just-extracted dataset, which archive it came from and its validation
    split's content fingerprint, so a later run can tell the split is still that archive's."""
    base = Path(dataset)
    write_json(base / DOWNLOAD_RECORD, {"archive_sha1": archive_sha1, "url": url,
                                        "validation": _content_fingerprint(base, "validation")["fingerprint"]})


def val_data(root: str | Path, record: dict | None = None) -> tuple[str, str]:
    """What the validation split of ``root`` is: (one of harness.contract.VAL_DATA_KINDS, why).
    ``record``: its ``split_fingerprint`` when the caller has it."""
    from .download import OFFICIAL_SHA1

    base = dataset_dir(root)
    if (base / SYNTH_MARKER).exists():
        return VAL_GENERATED, f"generated by segrepro data synth ({SYNTH_MARKER})"
    images = [e.name for e in _entries(base, "validation", "images")]
    labels = [e.name for e in _entries(base, "validation", "annotations")]
    if (images, labels) != _official_val_names():
        return VAL_OTHER, (f"{len(images)} validation images, not the official ADE_val_00000001.jpg .. "
                           f"ADE_val_{ADE20K_VAL_IMAGES:08d}.jpg with same-named .png labels")
    try:
        saved = json.loads((base / DOWNLOAD_RECORD).read_text())
    except (OSError, ValueError):
        return VAL_UNVERIFIED, (f"official names and count; content not verified (no {DOWNLOAD_RECORD}: "
                                f"not extracted by segrepro data download)")
    if saved.get("archive_sha1") != OFFICIAL_SHA1:
        return VAL_UNVERIFIED, (f"official names and count; extracted from an archive with SHA-1 "
                                f"{saved.get('archive_sha1')}, not the official {OFFICIAL_SHA1}")
    now = (record or split_fingerprint(root, "validation"))["fingerprint"]
    if saved.get("validation") != now:
        return VAL_UNVERIFIED, (f"official names and count; content changed since the official archive was "
                                f"extracted (fingerprint {now}, recorded {saved.get('validation')})")
    return VAL_ADE20K, f"the official validation split, as extracted from the archive with SHA-1 {OFFICIAL_SHA1}"
