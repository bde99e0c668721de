"""Verify an ADE20K directory: layout, pairing, decodability, sizes, label values.

Split-size rule: the official counts (20,210 training / 2,000 validation) are checked when
``expect_full=True`` (CLI ``--strict``), never when False, and by default (None) only when
some split holds more than ``FULL_SIZE_THRESHOLD`` images: a generated dataset is smaller
than that and is not flagged, while a real download missing or gaining files is.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .ade20k import DATASET_DIRNAME, NUM_CLASSES, SPLIT_PREFIX, SPLITS, dataset_dir

OFFICIAL_SIZES = {"training": 20210, "validation": 2000}
FULL_SIZE_THRESHOLD = 1000


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _check_pair(img: Path | None, lab: Path | None) -> list[Problem]:
    problems, img_size = [], None
    if img is not None:
        try:
            with Image.open(img) as im:
                im.load()
                img_size = im.size
        except Exception as e:  # PIL raises many types for corrupt data
            problems.append(Problem(str(img), f"image does not decode: {e}"))
    if lab is not None:
        try:
            with Image.open(lab) as im:
                im.load()
                if im.mode not in ("L", "P"):
                    problems.append(Problem(str(lab), f"label is mode {im.mode}, expected a "
                                                      "single-channel uint8 PNG (mode L)"))
                    return problems
                values = np.asarray(im)
                if img_size is not None and im.size != img_size:
                    problems.append(Problem(str(lab), f"label size {im.size[0]}x{im.size[1]} differs "
                                                      f"from image size {img_size[0]}x{img_size[1]} (WxH)"))
                top = int(values.max()) if values.size else 0
                if top > NUM_CLASSES:
                    bad = sorted(int(v) for v in np.unique(values[values > NUM_CLASSES]))
                    problems.append(Problem(str(lab), f"label values {bad[:10]} outside 0..{NUM_CLASSES}"))
        except Exception as e:
            problems.append(Problem(str(lab), f"label does not decode: {e}"))
    return problems


def check_dataset(root: str | Path, expect_full: bool | None = None, progress: bool = True,
                  workers: int | None = None, counts: dict | None = None) -> list[Problem]:
    """All problems found in the dataset at ``root`` (see ``dataset_dir``); [] when clean.
    ``counts``, where given, receives each split's ``{"images": N, "annotations": M}``.

    Every image and label is fully decoded (threads: PIL releases the GIL while decoding).
    """
    base = dataset_dir(root)
    if not base.is_dir():
        return [Problem(str(base), f"no dataset here: expected a directory {DATASET_DIRNAME} with "
                                   "images/ and annotations/")]
    problems: list[Problem] = []
    jobs: list[tuple[Path | None, Path | None]] = []
    sizes = {}
    for split in SPLITS:
        name_re = re.compile(rf"{SPLIT_PREFIX[split]}\d{{8}}")
        dirs = {kind: base / kind / split for kind in ("images", "annotations")}
        missing = [d for d in dirs.values() if not d.is_dir()]
        for d in missing:
            problems.append(Problem(str(d), "missing directory"))
        if missing:
            continue
        stems = {}
        for kind, ext in (("images", ".jpg"), ("annotations", ".png")):
            stems[kind] = {}
            for entry in sorted(os.scandir(dirs[kind]), key=lambda e: e.name):
                p = Path(entry.path)
                if not entry.is_file() or p.suffix != ext:
                    problems.append(Problem(str(p), f"unexpected entry, {kind}/{split} holds only *{ext} files"))
                elif not name_re.fullmatch(p.stem):
                    problems.append(Problem(str(p), f"name does not match {SPLIT_PREFIX[split]}XXXXXXXX{ext}"))
                else:
                    stems[kind][p.stem] = p
        imgs, labs = stems["images"], stems["annotations"]
        for s in sorted(imgs.keys() - labs.keys()):
            problems.append(Problem(str(imgs[s]), f"image has no label (expected {dirs['annotations'] / (s + '.png')})"))
        for s in sorted(labs.keys() - imgs.keys()):
            problems.append(Problem(str(labs[s]), f"label has no image (expected {dirs['images'] / (s + '.jpg')})"))
        jobs += [(imgs.get(s), labs.get(s)) for s in sorted(imgs.keys() | labs.keys())]
        sizes[split] = len(imgs)
        if counts is not None:
            counts[split] = {"images": len(imgs), "annotations": len(labs)}
    full = expect_full if expect_full is not None else any(n > FULL_SIZE_THRESHOLD for n in sizes.values())
    if full:
        for split, n in sizes.items():
            if n != OFFICIAL_SIZES[split]:
                problems.append(Problem(str(base / "images" / split),
                                        f"{n} images, the official split has {OFFICIAL_SIZES[split]}"))
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        results = pool.map(lambda job: _check_pair(*job), jobs)
        for found in tqdm(results, total=len(jobs), desc="check", unit="pair", disable=not progress):
            problems += found
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True,
                        help=f"directory containing {DATASET_DIRNAME}, or that directory itself")
    parser.add_argument("--strict", action="store_true",
                        help="require the official split sizes (default: only when a split has "
                             f"more than {FULL_SIZE_THRESHOLD} images)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    if not dataset_dir(args.root).is_dir():
        print(f"segrepro data check: --root {args.root}: no {DATASET_DIRNAME} directory there "
              "(expected the directory containing it, or the directory itself)", file=sys.stderr)
        return 2
    counts: dict = {}
    problems = check_dataset(args.root, expect_full=True if args.strict else None,
                             progress=not args.json, counts=counts)
    if args.json:
        print(json.dumps({"root": str(dataset_dir(args.root)), "ok": not problems, "counts": counts,
                          "problems": [asdict(p) for p in problems]}, indent=1))
    else:
        for p in problems:
            print(p, file=sys.stderr)
        found = "; ".join(f"{split} {c['images']} images, {c['annotations']} annotations"
                          for split, c in counts.items())
        print(f"{dataset_dir(args.root)}: " + (f"{len(problems)} problem(s)" if problems else "ok") +
              (f" ({found})" if found else ""))
    return 1 if problems else 0
