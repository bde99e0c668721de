"""Download, verify and unpack ADEChallengeData2016.zip.

Files, all beside the dataset directory (``dataset_dir(root).parent``):
- ``ADEChallengeData2016.zip.part``: bytes received so far. An interrupted transfer keeps
  it and the next call resumes it with an HTTP Range request (a server that ignores Range
  restarts it from zero).
- ``ADEChallengeData2016.zip``: the complete archive, renamed from ``.part`` only once its
  SHA-1 matched. Removed after extraction unless ``keep_archive``.
- ``ADEChallengeData2016.zip.bad``: a complete download whose SHA-1 did not match. Those
  bytes cannot be repaired by resuming, so they are moved aside (replacing an older .bad)
  for inspection and the next call downloads afresh.
- ``.ADEChallengeData2016.extract-*``: the archive is unpacked into this temporary
  directory and its ``ADEChallengeData2016`` renamed into place only when complete; a
  leftover from an interrupted run is removed by the next call.
So ``ADEChallengeData2016`` exists only when complete: if it exists, download() returns it.
It holds ``segrepro_download.json``: the archive's SHA-1 and its validation split's fingerprint,
by which a later run tells the official split from other data (harness/data/fingerprint.py).

Only the dataset's layout is extracted: files in
``ADEChallengeData2016/{images,annotations}/{training,validation}/``. The directory entries
of that tree and the official archive's metadata files (``objectInfo150.txt``,
``sceneCategories.txt``) are skipped; any other member (``../x``, an absolute path, another
folder) refuses the whole archive before anything is written.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from harness.config import InputError

from .ade20k import DATASET_DIRNAME, SPLITS, dataset_dir
from .fingerprint import write_download_record

OFFICIAL_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
OFFICIAL_SHA1 = "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"
ARCHIVE_NAME = f"{DATASET_DIRNAME}.zip"
KINDS = ("images", "annotations")
# beside the splits in the official archive; segrepro reads neither
METADATA_FILES = tuple(f"{DATASET_DIRNAME}/{name}" for name in ("objectInfo150.txt", "sceneCategories.txt"))

# What a dropped or stalled connection raises while streaming; worth a resume.
_TRANSIENT = (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError,
              TimeoutError, urllib.error.URLError)


class DownloadError(RuntimeError):
    pass


class _Interrupted(Exception):
    pass


def sha1_of(path: Path, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _total_from_content_range(value: str | None) -> int | None:
    m = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", (value or "").strip())
    return int(m.group(1)) if m else None


def _fetch(url: str, part: Path, timeout: float, chunk_size: int, progress: bool) -> None:
    """Append the rest of ``url`` to ``part``; raises _Interrupted if the stream ends early."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "segrepro"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Nothing left after offset: the part is the whole file, or longer than it.
            if _total_from_content_range(e.headers.get("Content-Range")) == offset:
                return
            part.unlink()
            return _fetch(url, part, timeout, chunk_size, progress)
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    with resp:
        start = 0
        if offset and resp.status == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(?:\d+|\*)", resp.headers.get("Content-Range", "").strip())
            if not m or int(m.group(1)) != offset:
                raise DownloadError(f"{url}: asked for bytes from {offset}, server answered "
                                    f"Content-Range {resp.headers.get('Content-Range')!r}")
            start = offset
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with open(part, "ab" if start else "wb") as f, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=ARCHIVE_NAME, disable=not progress) as bar:
            try:
                while chunk := resp.read(chunk_size):
                    f.write(chunk)
                    bar.update(len(chunk))
            except _TRANSIENT as e:
                raise _Interrupted(f"{type(e).__name__}: {e}") from e
        got = part.stat().st_size
        if total is not None and got < total:
            raise _Interrupted(f"connection closed after {got} of {total} bytes")


def _along_layout(parts: list[str]) -> bool:
    """Whether path components follow ADEChallengeData2016/{images,annotations}/{training,validation}."""
    return all(part in allowed for part, allowed in zip(parts, ({DATASET_DIRNAME}, KINDS, SPLITS)))


def _dataset_members(zf: zipfile.ZipFile, archive: Path) -> list[zipfile.ZipInfo]:
    """The archive's files in the dataset layout; raises InputError naming the first member
    outside it (see the module doc)."""
    keep = []
    for member in zf.infolist():
        parts = member.filename.split("/")
        if member.is_dir():  # "A/B/" splits as [A, B, ""]
            inside = 2 <= len(parts) <= 4 and _along_layout(parts[:-1])
        elif member.filename in METADATA_FILES:
            inside = True
        else:
            inside = len(parts) == 4 and _along_layout(parts[:3]) and parts[3] not in ("", ".", "..")
            if inside:
                keep.append(member)
        if not inside:
            raise InputError(f"{archive}: member {member.filename!r} lies outside "
                             f"{DATASET_DIRNAME}/{{images,annotations}}/{{training,validation}}/; "
                             f"refusing to extract the archive")
    return keep


def _extract(archive: Path, target: Path, progress: bool, sha1: str, url: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = _dataset_members(zf, archive)
            if not members:
                raise DownloadError(f"{archive}: no files under {DATASET_DIRNAME}/{{images,annotations}}/ "
                                    f"in the archive")
            tmp = Path(tempfile.mkdtemp(prefix=f".{DATASET_DIRNAME}.extract-", dir=target.parent))
            try:
                for member in tqdm(members, desc="extract", unit="file", disable=not progress):
                    zf.extract(member, tmp)
                # what a later run verifies the validation split against (harness.data.fingerprint.val_data)
                write_download_record(tmp / DATASET_DIRNAME, sha1, url)
                os.replace(tmp / DATASET_DIRNAME, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise DownloadError(f"{archive}: not a valid zip archive ({e}); delete it to download again") from e


def download(root: str | Path, url: str = OFFICIAL_URL, sha1: str = OFFICIAL_SHA1, *,
             retries: int = 3, retry_wait: float = 2.0, timeout: float = 60.0,
             chunk_size: int = 1 << 20, keep_archive: bool = False, progress: bool = True) -> Path:
    """Make ``dataset_dir(root)`` hold the extracted archive from ``url``; return it.

    A dropped connection is resumed up to ``retries`` times (waiting retry_wait * 2**k
    seconds); after that DownloadError says where the resumable ``.part`` is. A wrong
    SHA-1 raises DownloadError after moving the download to ``.bad`` (see module doc).
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"--url {url!r}: expected an http:// or https:// URL")
    sha1 = sha1.lower()
    if not re.fullmatch(r"[0-9a-f]{40}", sha1):
        raise ValueError(f"--sha1 {sha1!r}: expected 40 hexadecimal digits")
    target = dataset_dir(root)
    if target.is_dir():
        return target
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{DATASET_DIRNAME}.extract-*"):
        shutil.rmtree(stale, ignore_errors=True)
    archive = parent / ARCHIVE_NAME
    part = parent / (ARCHIVE_NAME + ".part")
    bad = parent / (ARCHIVE_NAME + ".bad")

    if not archive.exists():
        for attempt in range(retries + 1):
            try:
                _fetch(url, part, timeout, chunk_size, progress)
                break
            except _Interrupted as e:
                reason = e
            except urllib.error.URLError as e:  # refused / unreachable before any byte
                reason = e
            if attempt < retries:
                time.sleep(retry_wait * 2 ** attempt)
        else:
            # a transfer refused before its first byte leaves no .part to name
            kept = part.stat().st_size if part.exists() else 0
            held = f"{kept} bytes kept in {part}; run again to resume" if kept else "nothing received; run again"
            raise DownloadError(f"{url}: transfer failed after {retries + 1} attempt(s) ({reason}); {held}")
        got = sha1_of(part)
        if got != sha1:
            os.replace(part, bad)
            raise DownloadError(f"{url}: SHA-1 {got} does not match the expected {sha1}; the "
                                f"download was moved to {bad} and will not be resumed")
        os.replace(part, archive)
    else:
        got = sha1_of(archive)
        if got != sha1:
            os.replace(archive, bad)
            raise DownloadError(f"{archive}: SHA-1 {got} does not match the expected {sha1}; "
                                f"moved to {bad}")
    _extract(archive, target, progress, sha1, url)
    if not keep_archive:
        archive.unlink()
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True,
                        help=f"directory to hold {DATASET_DIRNAME} (or that directory itself)")
    parser.add_argument("--url", default=OFFICIAL_URL, help="archive URL (default: the official one)")
    parser.add_argument("--sha1", default=OFFICIAL_SHA1, help="expected SHA-1 of the archive")
    parser.add_argument("--keep-archive", action="store_true", help="keep the zip after extracting")


def run(args: argparse.Namespace) -> int:
    try:
        path = download(args.root, args.url, args.sha1, keep_archive=args.keep_archive)
    except ValueError as e:
        print(f"segrepro data download: {e}", file=sys.stderr)
        return 2
    except (DownloadError, OSError) as e:
        print(f"segrepro data download: {e}", file=sys.stderr)
        return 1
    print(f"ADE20K ready at {path}")
    return 0
