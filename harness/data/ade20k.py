"""ADE20K (ADEChallengeData2016) on disk: class names, palette, label reduction, Dataset.

Layout: ``ADEChallengeData2016/{images,annotations}/{training,validation}``; images
``ADE_train_XXXXXXXX.jpg`` / ``ADE_val_XXXXXXXX.jpg``, labels the same stem ``.png`` (uint8,
0 = unlabelled, k = class k-1). A generated dataset (``harness.data.synth``) uses the same
layout with fewer classes; its labels are still ADE20K indices, so nothing here changes.

Root convention (every ``root`` argument of ``harness.data``): either the directory that
contains ``ADEChallengeData2016`` or that directory itself; see :func:`dataset_dir`.

A file that cannot be used raises ``DataError``, an ``InputError`` (harness.config, which
imports nothing of the project) so every command reports it as bad input naming the file.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from PIL import Image

from harness.config import InputError

DATASET_DIRNAME = "ADEChallengeData2016"
SPLITS = ("training", "validation")
SPLIT_PREFIX = {"training": "ADE_train_", "validation": "ADE_val_"}
NUM_CLASSES = 150
IGNORE_INDEX = 255

# The 150 ADE20K SceneParsing classes in the standard order (MMSegmentation
# mmseg/datasets/ade.py; MMSeg writes 'bed ' with a stray trailing space, dropped here).
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# The standard ADE20K palette (RGB) as used by MMSegmentation, one colour per class above.
PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

# uint8 -> uint8 lookup: 0 (unlabelled) -> 255, k -> k-1. Values above 150 are not ADE20K
# classes; they map to ignore rather than to a class index the model would be trained on.
_REDUCE_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_REDUCE_LUT[1:NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)

# Colour lookup for colorize: index 255 (ignore) and every non-class value -> black.
_COLOR_LUT = np.zeros((256, 3), dtype=np.uint8)
_COLOR_LUT[:NUM_CLASSES] = np.asarray(PALETTE, dtype=np.uint8)


def dataset_dir(root: str | Path) -> Path:
    """The ADEChallengeData2016 directory for ``root``.

    ``root`` may be the dataset directory itself (named ADEChallengeData2016, or holding
    ``images/`` or ``annotations/``) or the directory that contains it.
    """
    root = Path(root)
    if root.name == DATASET_DIRNAME or (root / "images").is_dir() or (root / "annotations").is_dir():
        return root
    return root / DATASET_DIRNAME


def reduce_label(label: np.ndarray) -> np.ndarray:
    """ADE20K file label (0 = unlabelled, k = class k-1) -> training label (255 = ignore)."""
    label = np.asarray(label)
    if label.dtype != np.uint8:
        raise TypeError(f"reduce_label expects a uint8 label map, got dtype {label.dtype}")
    # a table lookup, several times faster than numpy indexing (cv2 returns 1-D input as a column)
    return cv2.LUT(label, _REDUCE_LUT).reshape(label.shape)


def colorize(label_map: np.ndarray | torch.Tensor) -> Image.Image:
    """Reduced label map (0..149, 255 = ignore) -> RGB PIL image in the ADE20K palette."""
    if isinstance(label_map, torch.Tensor):
        label_map = label_map.detach().cpu().numpy()
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"colorize expects an HxW label map, got shape {label_map.shape}")
    # Out-of-range values (negative, > 255) are not classes: show them as ignore.
    idx = np.where((label_map >= 0) & (label_map < NUM_CLASSES), label_map, IGNORE_INDEX)
    return Image.fromarray(_COLOR_LUT[idx.astype(np.intp)], mode="RGB")


class DataError(InputError):
    """A dataset file that cannot be used; the message starts with its path.

    Raised in a DataLoader worker it reaches the training process rebuilt from the worker's
    traceback text (torch re-raises ``type(e)(traceback)``); the original message is that
    traceback's last line, so it is recovered here and the file is still named once.
    """

    def __init__(self, message: str):
        if message.startswith(f"Caught {type(self).__name__} "):
            last = message.rstrip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 HxWx3; grey or CMYK JPEGs are converted (MMSeg loads with color_type='color')."""
    try:
        with Image.open(path) as im:
            # most ADE20K JPEGs are RGB already: convert() would only add a copy
            return np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image: {e}") from e


def load_label(path: Path) -> np.ndarray:
    """Raw uint8 HxW label map as stored (0 = unlabelled)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise DataError(f"{path}: expected a single-channel uint8 PNG (mode L), got mode {im.mode}")
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot decode label: {e}") from e


def list_pairs(root: str | Path, split: str) -> list[tuple[str, Path, Path]]:
    """Sorted (name, image path, label path) of one split; raises naming the first problem."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    base = dataset_dir(root)
    img_dir, ann_dir = base / "images" / split, base / "annotations" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: missing directory (expected the ADE20K layout "
                                    f"{DATASET_DIRNAME}/{{images,annotations}}/{{training,validation}})")
    pairs = []
    for img in sorted(img_dir.glob("*.jpg")):
        lab = ann_dir / (img.stem + ".png")
        if not lab.is_file():
            raise FileNotFoundError(f"{lab}: missing label for image {img}")
        pairs.append((img.stem, img, lab))
    if not pairs:
        raise FileNotFoundError(f"{img_dir}: no .jpg images")
    return pairs


Transform = Callable[..., tuple]


class ADE20K(torch.utils.data.Dataset):
    """One split of ADE20K.

    Item: ``{"image", "label", "name", "index"}``. Without a transform, ``image`` is uint8
    HxWx3 RGB numpy and ``label`` the reduced uint8 HxW numpy (255 = ignore). With a
    transform ``t``, the item holds ``t(image, label, rng)`` (see ``harness.data.transforms``).

    Randomness: each item draws from its own ``numpy.random.Generator`` seeded with
    ``(seed, epoch, index)`` where ``index`` is the index in the full split. Augmentation
    therefore depends only on (seed, epoch, image), never on the number of DataLoader
    workers, their scheduling, or the rank count. Call :meth:`set_epoch` before each epoch
    (with non-persistent workers the copy in each worker picks it up when the loader is
    iterated), or index with ``(epoch, i)`` pairs, which works with persistent workers too.
    """

    num_classes = NUM_CLASSES
    ignore_index = IGNORE_INDEX
    classes = CLASSES
    palette = PALETTE

    def __init__(self, root: str | Path, split: str = "training",
                 transform: Transform | None = None, seed: int = 0):
        self.root = dataset_dir(root)
        self.split = split
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self._pairs = list_pairs(self.root, split)
        self._indices = list(range(len(self._pairs)))

    def __len__(self) -> int:
        return len(self._indices)

    @property
    def names(self) -> list[str]:
        return [self._pairs[i][0] for i in self._indices]

    def files(self, i: int) -> tuple[Path, Path]:
        """(image path, label path) of item i."""
        _, img, lab = self._pairs[self._indices[i]]
        return img, lab

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self, rank: int, world_size: int) -> "ADE20K":
        """Items rank, rank+world_size, ... of this dataset (strided, deterministic).

        The shards of ranks 0..world_size-1 together hold every item exactly once; their
        lengths differ by at most one (no padding with duplicates, so a dataset-level
        confusion matrix summed over ranks counts each image once).
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"shard needs 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        part = copy.copy(self)
        part._indices = self._indices[rank::world_size]
        return part

    def head(self, n: int) -> "ADE20K":
        """The first ``n`` items (``--limit`` of an evaluation)."""
        part = copy.copy(self)
        part._indices = self._indices[:max(n, 0)]
        return part

    def __getitem__(self, i: int | tuple[int, int]) -> dict:
        epoch = self.epoch
        if isinstance(i, tuple):
            epoch, i = i
        index = self._indices[i]
        name, img_path, lab_path = self._pairs[index]
        image = load_image(img_path)
        label = load_label(lab_path)
        if image.shape[:2] != label.shape:
            raise DataError(f"{lab_path}: label size {label.shape[::-1]} (WxH) differs from "
                             f"image size {image.shape[1::-1]} of {img_path}")
        label = reduce_label(label)
        if self.transform is not None:
            rng = np.random.default_rng((self.seed, int(epoch), index))
            image, label = self.transform(image, label, rng)
        return {"image": image, "label": label, "name": name, "index": index}
