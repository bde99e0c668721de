"""Generate a dataset in the exact ADE20K layout whose classes are learnable.

Class k (label value k, ADE20K class k-1) has a fixed appearance, the same in every image
and split: its own mean colour (hues spread by the golden ratio, alternating saturation
and value) plus luminance stripes of a class-specific frequency and orientation. Images
are multiplicatively weighted Voronoi partitions with ellipses on top; region borders
(1 px) and the occasional grey "void" ellipse are labelled 0 (unlabelled), like ADE20K.
Files are byte-identical for the same arguments: every image draws from its own generator
seeded with (seed, split, index), and JPEG/PNG encoding is deterministic.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .ade20k import CLASSES, DATASET_DIRNAME, NUM_CLASSES, SPLIT_PREFIX, SPLITS, dataset_dir

JPEG_QUALITY = 95
METADATA_FILE = "segrepro_synth.json"
_STRIPE_AMPLITUDE = 28.0
_FREQS = (1 / 4, 1 / 6, 1 / 9, 1 / 14)  # cycles per pixel


def class_appearance(classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label value 0..classes: RGB colour (float), stripe frequency, stripe angle.

    Value 0 (unlabelled) is mid grey without stripes.
    """
    colors = np.zeros((classes + 1, 3), np.float32)
    freqs = np.zeros(classes + 1, np.float32)
    angles = np.zeros(classes + 1, np.float32)
    colors[0] = 128.0
    for k in range(classes):
        hue = (k * 0.6180339887) % 1.0
        sat = (0.9, 0.55)[k % 2]
        val = (0.95, 0.62, 0.8)[k % 3]
        colors[k + 1] = np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255.0
        freqs[k + 1] = _FREQS[k % len(_FREQS)]
        angles[k + 1] = np.deg2rad((k * 47) % 180)
    return colors, freqs, angles


def _label_map(rng: np.random.Generator, h: int, w: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(appearance map with values 0..classes, stored label with borders set to 0)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    n = int(rng.integers(3, 8))
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    weight = rng.uniform(0.5, 2.0, n)
    dist = np.stack([((yy - cy[i]) ** 2 + (xx - cx[i]) ** 2) * weight[i] for i in range(n)])
    region_cls = rng.integers(1, classes + 1, n)
    cls = region_cls[dist.argmin(0)].astype(np.uint8)
    for _ in range(int(rng.integers(0, 3))):
        ey, ex = rng.uniform(0, h), rng.uniform(0, w)
        ay, ax = rng.uniform(0.08, 0.3) * h, rng.uniform(0.08, 0.3) * w
        t = rng.uniform(0, np.pi)
        dy, dx = yy - ey, xx - ex
        u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
        inside = (u / ax) ** 2 + (v / ay) ** 2 <= 1.0
        # A void ellipse now and then, so unlabelled regions are not only thin borders.
        cls[inside] = 0 if rng.random() < 0.15 else rng.integers(1, classes + 1)
    label = cls.copy()
    border = np.zeros((h, w), bool)
    border[:, 1:] |= cls[:, 1:] != cls[:, :-1]
    border[1:, :] |= cls[1:, :] != cls[:-1, :]
    label[border] = 0
    return cls, label


def render(rng: np.random.Generator, h: int, w: int, classes: int, appearance=None) -> tuple[np.ndarray, np.ndarray]:
    """One (uint8 HxWx3 image, uint8 HxW label with 0 = unlabelled) pair."""
    colors, freqs, angles = appearance if appearance is not None else class_appearance(classes)
    cls, label = _label_map(rng, h, w, classes)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, classes + 1).astype(np.float32)
    jitter = rng.uniform(-12, 12, (classes + 1, 3)).astype(np.float32)
    a = angles[cls]
    stripes = np.sin(2 * np.pi * freqs[cls] * (xx * np.cos(a) + yy * np.sin(a)) + phase[cls])
    noise_sigma = np.where(cls == 0, 20.0, 4.0).astype(np.float32)
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * noise_sigma[..., None]
    img = colors[cls] + jitter[cls] + _STRIPE_AMPLITUDE * stripes[..., None] + noise
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), label


def synthesize(root: str | Path, train: int = 200, val: int = 50, size: tuple[int, int] = (128, 128),
               classes: int = 8, seed: int = 0, overwrite: bool = False, progress: bool = False) -> Path:
    """Write a generated dataset to ``dataset_dir(root)`` and return that path.

    It is built in a temporary directory beside the target and renamed into place when
    complete. An existing target raises FileExistsError unless ``overwrite``.
    """
    h, w = size
    if train < 1 or val < 1:
        raise ValueError(f"train and val must be >= 1, got train={train}, val={val}")
    if h < 8 or w < 8:
        raise ValueError(f"size must be at least 8x8, got {h}x{w}")
    if not 1 <= classes <= NUM_CLASSES:
        raise ValueError(f"classes must be in 1..{NUM_CLASSES}, got {classes}")
    target = dataset_dir(root)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass --overwrite to replace it, or remove it first)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.synth-", dir=target.parent))
    try:
        appearance = class_appearance(classes)
        counts = {"training": train, "validation": val}
        total = train + val
        with tqdm(total=total, desc="synth", unit="img", disable=not progress) as bar:
            for s, split in enumerate(SPLITS):
                img_dir, ann_dir = tmp / "images" / split, tmp / "annotations" / split
                img_dir.mkdir(parents=True)
                ann_dir.mkdir(parents=True)
                for i in range(counts[split]):
                    rng = np.random.default_rng((seed, s, i))
                    image, label = render(rng, h, w, classes, appearance)
                    stem = f"{SPLIT_PREFIX[split]}{i + 1:08d}"
                    Image.fromarray(image).save(img_dir / f"{stem}.jpg", quality=JPEG_QUALITY)
                    Image.fromarray(label, mode="L").save(ann_dir / f"{stem}.png")
                    bar.update()
        meta = {"generator": "segrepro synth", "train": train, "val": val, "size": [h, w],
                "classes": classes, "seed": seed, "class_names": list(CLASSES[:classes])}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--size {text!r}: expected HxW with positive integers, e.g. 128x128")
    return int(parts[0]), int(parts[1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True,
                        help=f"directory to hold {DATASET_DIRNAME} (or that directory itself)")
    parser.add_argument("--train", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    parser.add_argument("--size", default="128x128", help="image size HxW (default 128x128)")
    parser.add_argument("--classes", type=int, default=8, help="number of classes K, labels 1..K (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")


def run(args: argparse.Namespace) -> int:
    try:
        size = _parse_size(args.size)
        path = synthesize(args.root, train=args.train, val=args.val, size=size,
                          classes=args.classes, seed=args.seed, overwrite=args.overwrite,
                          progress=True)
    except (ValueError, FileExistsError) as e:
        print(f"segrepro data synth: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.train} training and {args.val} validation images ({size[0]}x{size[1]}, "
          f"{args.classes} classes, seed {args.seed}) to {path}")
    return 0
