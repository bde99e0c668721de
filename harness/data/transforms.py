"""Training and test pipelines of the three Segmenter recipes (reference §3 and §5).

Every transform is a callable ``t(image, label, rng) -> (image, label)``:
``image`` uint8 HxWx3 RGB numpy, ``label`` reduced uint8 HxW numpy (255 = ignore, as
``ADE20K`` yields it), ``rng`` a ``numpy.random.Generator``, a ``torch.Generator`` or an
int seed (None: fresh OS entropy). It returns a float32 3xHxW normalised image tensor and
an int64 HxW label tensor. ``mean``/``std`` are in pixel units (0..255), as in the configs.

Seeding scheme (see also ``ADE20K``): the dataset gives each item its own generator seeded
with (seed, epoch, index), so a DataLoader yields the same samples for any number of
workers. ``seed_worker`` and ``loader_generator`` make the rest of the loader (sampler
order, any code that touches the global RNGs) a function of (seed, epoch, rank).
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageEnhance

IGNORE_INDEX = 255
BILINEAR = F.InterpolationMode.BILINEAR
NEAREST = F.InterpolationMode.NEAREST

RECIPES = ("reference", "mmseg", "paddlevit")


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**63 - 1, (1,), generator=rng)))
    return np.random.default_rng(rng)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h <= 0 or w <= 0:
        raise ValueError(f"crop size must be positive, got {size!r}")
    return int(h), int(w)


def _to_tensors(image: np.ndarray, label: np.ndarray | None):
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    lab = None if label is None else torch.from_numpy(np.ascontiguousarray(label))[None]
    return img, lab


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.imrescale size: largest (h', w') with the aspect kept that fits within ``scale``.

    Factor min(long_target / long_side, short_target / short_side); sizes rounded half up.
    """
    long_t, short_t = max(scale), min(scale)
    f = min(long_t / max(h, w), short_t / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """PaddleViT's eval ``Resize(target_size=short)`` (paddle.vision functional_cv2.resize with an
    int): the short side to ``short``, the long side ``int(short * long / short_side)`` (truncated),
    no cap on the long side."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def resize_test_image(image: torch.Tensor, size: Sequence[int], rule: str = "fit") -> torch.Tensor:
    """A 3xHxW test image at ``size``, bilinear without antialiasing (cv2's INTER_LINEAR):
    "fit" resizes the uint8 image (MMSeg's uint8 result), "short_side" the float32 image
    (PaddleViT reads images as float32)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    src = image.float() if rule == "short_side" else image
    return F.resize(src, list(size), interpolation=BILINEAR, antialias=False)


def normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or float 3xHxW (pixel units) -> float32 (x - mean) / std."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (image.float() - m) / s


def _pad_to(img: torch.Tensor, lab: torch.Tensor, h: int, w: int, img_fill) -> tuple:
    ph, pw = max(h - img.shape[-2], 0), max(w - img.shape[-1], 0)
    if ph or pw:
        # Bottom/right padding only, as MMSeg Pad and PaddleViT RandomPaddingCrop do.
        img = F.pad(img, [0, 0, pw, ph], fill=img_fill)
        lab = F.pad(lab, [0, 0, pw, ph], fill=IGNORE_INDEX)
    return img, lab


# ---------------------------------------------------------------- MMSeg / reference recipe

def _clip_u8(x: torch.Tensor) -> torch.Tensor:
    # float -> uint8 by clipping then truncating, like MMSeg's convert() (astype(np.uint8)).
    return x.clamp_(0, 255).to(torch.uint8)


def _scale_saturation(img: torch.Tensor, alpha: float) -> torch.Tensor:
    """Scale HSV saturation by alpha (clipped at 1), hue and value kept.

    With V = max(r,g,b) fixed, S' = alpha*S moves every channel towards V by the same
    factor: c' = V - k (V - c), k = min(alpha, V / (V - min)). This is MMSeg's
    bgr2hsv -> S*alpha -> hsv2bgr without the uint8 round trip through OpenCV's HSV.
    """
    x = img.float()
    v = x.amax(dim=0, keepdim=True)
    spread = v - x.amin(dim=0, keepdim=True)
    k = torch.where(spread > 0, torch.clamp(v / spread.clamp(min=1e-6), max=alpha),
                    torch.ones_like(v))
    return _clip_u8((v - k * (v - x)).round_())


class MMSegTrainTransform:
    """Reference (OFF) = MMSegmentation ADE20K training pipeline, reimplemented:

    Resize(img_scale=scale, ratio_range, keep_ratio=True) -> RandomCrop(crop,
    cat_max_ratio) -> RandomFlip(0.5) -> PhotoMetricDistortion -> Normalize ->
    Pad(crop, pad_val=0, seg_pad_val=255). Bilinear for the image, nearest for the label.
    """

    def __init__(self, crop_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                 scale: tuple[int, int] = (2048, 512), ratio_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float = 0.75, crop_tries: int = 10, flip_prob: float = 0.5,
                 photometric: bool = True):
        self.crop = _pair(crop_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.crop_tries = cat_max_ratio, crop_tries
        self.flip_prob, self.photometric = flip_prob, photometric

    def __call__(self, image: np.ndarray, label: np.ndarray, rng=None):
        rng = _as_rng(rng)
        img, lab = _to_tensors(image, label)
        img, lab = self._resize(img, lab, rng)
        img, lab = self._random_crop(img, lab, rng)
        if rng.random() < self.flip_prob:
            img, lab = F.hflip(img), F.hflip(lab)
        if self.photometric:
            img = self._photometric(img, rng)
        img = normalize(img, self.mean, self.std)
        img, lab = _pad_to(img, lab, *self.crop, img_fill=0.0)
        return img, lab[0].long()

    def _resize(self, img, lab, rng):
        # MMSeg Resize.random_sample_ratio: r ~ U(lo, hi), target (int(2048 r), int(512 r)).
        lo, hi = self.ratio_range
        r = rng.random() * (hi - lo) + lo
        target = (int(self.scale[0] * r), int(self.scale[1] * r))
        size = list(rescale_size(img.shape[-2], img.shape[-1], target))
        # antialias=False: mmcv/cv2 INTER_LINEAR does not low-pass when shrinking.
        img = F.resize(img, size, interpolation=BILINEAR, antialias=False)
        lab = F.resize(lab, size, interpolation=NEAREST)
        return img, lab

    def _crop_box(self, h, w, rng):
        ch, cw = self.crop
        y = int(rng.integers(0, max(h - ch, 0) + 1))
        x = int(rng.integers(0, max(w - cw, 0) + 1))
        return y, y + ch, x, x + cw

    def _random_crop(self, img, lab, rng):
        # MMSeg RandomCrop: redraw the box up to crop_tries times while one class covers
        # >= cat_max_ratio of the labelled pixels of the crop or fewer than 2 classes are
        # present; after the last failed try the next drawn box is used unchecked.
        h, w = lab.shape[-2:]
        box = self._crop_box(h, w, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.crop_tries):
                y0, y1, x0, x1 = box
                counts = torch.bincount(lab[0, y0:y1, x0:x1].reshape(-1).long(), minlength=256)
                counts = counts[:IGNORE_INDEX]
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                box = self._crop_box(h, w, rng)
        y0, y1, x0, x1 = box
        return img[:, y0:y1, x0:x1], lab[:, y0:y1, x0:x1]

    @staticmethod
    def _photometric(img, rng):
        # MMSeg PhotoMetricDistortion: brightness +U(-32,32); contrast xU(0.5,1.5) first
        # (mode 1) or last (mode 0); saturation xU(0.5,1.5); hue + randint(-18,18) in
        # OpenCV units of 2 degrees. Each step with probability 0.5, uint8 in between.
        if rng.integers(2):
            img = _clip_u8(img.float() + rng.uniform(-32, 32))
        mode = rng.integers(2)
        if mode == 1 and rng.integers(2):
            img = _clip_u8(img.float() * rng.uniform(0.5, 1.5))
        if rng.integers(2):
            img = _scale_saturation(img, rng.uniform(0.5, 1.5))
        if rng.integers(2):
            img = F.adjust_hue(img, int(rng.integers(-18, 18)) / 180.0)
        if mode == 0 and rng.integers(2):
            img = _clip_u8(img.float() * rng.uniform(0.5, 1.5))
        return img


# ---------------------------------------------------------------- PaddleViT recipe

# PaddleViT semantic_segmentation/train.py (BR-IDL/PaddleViT) builds, for every Segmenter
# ADE20K config:
#   ResizeStepScaling(0.5, 2.0, 0.25), RandomPaddingCrop(CROP_SIZE,
#   im_padding_value=(123.675, 116.28, 103.53), label_padding_value=255),
#   RandomHorizontalFlip(0.5), RandomDistort(brightness_range=0.4, contrast_range=0.4,
#   saturation_range=0.4), Normalize(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
# from src/transforms/transforms.py. Behaviours kept here:
# - ResizeStepScaling draws s ~ U(0.5, 2.0) continuously (the step is unused, "option 1")
#   and calls paddle's resize(img, (w, h)) with w = round(s W), h = round(s H); paddle reads
#   that tuple as (height, width), so the output is round(s W) high and round(s H) wide:
#   the aspect is transposed. swap_hw=True reproduces that, False keeps the aspect.
# - RandomPaddingCrop pads bottom/right (image with the ImageNet mean in pixel space, label
#   255) to at least the crop, then crops at a uniform offset; no cat_max_ratio.
# - RandomDistort applies brightness, contrast, saturation (PIL ImageEnhance factors
#   U(1-0.4, 1+0.4)) and hue (PIL HSV, H + U(-18, 18) on the 0..255 hue scale, wrapped
#   by the uint8 cast) in a random order, each with probability 0.5, on the uint8 image.


def _pil_hue(im: Image.Image, delta: float) -> Image.Image:
    hsv = np.array(im.convert("HSV"))
    hsv[..., 0] = (np.trunc(hsv[..., 0] + delta).astype(np.int64) % 256).astype(np.uint8)
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


class PaddleViTTrainTransform:
    """PaddleViT's Segmenter ADE20K training pipeline (see the comment above)."""

    def __init__(self, crop_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                 scale_range: tuple[float, float] = (0.5, 2.0), distort_range: float = 0.4,
                 hue_range: float = 18, distort_prob: float = 0.5, flip_prob: float = 0.5,
                 im_pad_value: Sequence[float] = (123.675, 116.28, 103.53), swap_hw: bool = True):
        self.crop = _pair(crop_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale_range, self.distort_range = tuple(scale_range), distort_range
        self.hue_range, self.distort_prob, self.flip_prob = hue_range, distort_prob, flip_prob
        self.im_pad_value, self.swap_hw = list(im_pad_value), swap_hw

    def __call__(self, image: np.ndarray, label: np.ndarray, rng=None):
        rng = _as_rng(rng)
        img, lab = _to_tensors(image, label)
        lo, hi = self.scale_range
        s = rng.random() * (hi - lo) + lo
        h, w = img.shape[-2:]
        size = [round(s * w), round(s * h)] if self.swap_hw else [round(s * h), round(s * w)]
        # PaddleViT resizes the float32 image (cv2 reads float), so no uint8 rounding here.
        img = F.resize(img.float(), size, interpolation=BILINEAR, antialias=False)
        lab = F.resize(lab, size, interpolation=NEAREST)
        ch, cw = self.crop
        img, lab = _pad_to(img, lab, ch, cw, img_fill=self.im_pad_value)
        y = int(rng.integers(0, img.shape[-2] - ch + 1))
        x = int(rng.integers(0, img.shape[-1] - cw + 1))
        img, lab = img[:, y:y + ch, x:x + cw], lab[:, y:y + ch, x:x + cw]
        if rng.random() < self.flip_prob:
            img, lab = F.hflip(img), F.hflip(lab)
        img = self._distort(img, rng)
        return normalize(img, self.mean, self.std), lab[0].long()

    def _distort(self, img: torch.Tensor, rng) -> torch.Tensor:
        # RandomDistort casts the float image with astype('uint8'), i.e. truncation.
        im = Image.fromarray(img.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
        lo, hi = 1 - self.distort_range, 1 + self.distort_range
        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        for op in rng.permutation(4):
            if rng.uniform(0, 1) < self.distort_prob:
                if op < 3:
                    im = enhancers[op](im).enhance(rng.uniform(lo, hi))
                else:
                    im = _pil_hue(im, rng.uniform(-self.hue_range, self.hue_range))
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------- test

class TestTransform:
    """Test resize + Normalize, by the protocol's ``resize`` rule (EvalConfig.resize):

    "fit": MMSeg test Resize(scale=(max_long_side, test_scale), keep_ratio=True) on the uint8
    image: the short side goes to ``test_scale`` unless the long side would exceed
    ``max_long_side`` (default 4 x test_scale: 2048 at 512, 2560 at 640, as in the MMSeg
    Segmenter configs). The label is returned at the original resolution: mIoU is computed
    there (reference §4).
    "short_side": PaddleViT's eval Resize on the float image (``short_side_size``), and the
    label resized (nearest) to the same size, where PaddleViT scores it.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, test_scale: int = 512, mean: Sequence[float] = (127.5,) * 3,
                 std: Sequence[float] = (127.5,) * 3, max_long_side: int | None = None, resize: str = "fit"):
        if test_scale <= 0:
            raise ValueError(f"test_scale must be positive, got {test_scale}")
        if resize not in ("fit", "short_side"):
            raise ValueError(f"resize must be 'fit' or 'short_side', got {resize!r}")
        self.test_scale, self.resize = test_scale, resize
        self.scale = (max_long_side or 4 * test_scale, test_scale)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: np.ndarray, label: np.ndarray | None = None, rng=None):
        img, lab = _to_tensors(image, label)
        h, w = img.shape[-2:]
        if self.resize == "short_side":
            size = list(short_side_size(h, w, self.test_scale))
            lab = None if lab is None else F.resize(lab, size, interpolation=NEAREST)
        else:
            size = list(rescale_size(h, w, self.scale))
        img = resize_test_image(img, size, self.resize)
        return normalize(img, self.mean, self.std), None if lab is None else lab[0].long()


def build_train_transform(recipe: str, crop_size: int | Sequence[int], mean: Sequence[float],
                          std: Sequence[float], **kwargs):
    """Training transform of a recipe: "reference" and "mmseg" (same pipeline) or "paddlevit".

    ``kwargs`` go to the transform class (e.g. ``cat_max_ratio``, ``ratio_range``,
    ``photometric`` for MMSeg; ``swap_hw`` for PaddleViT).
    """
    if recipe in ("reference", "mmseg"):
        return MMSegTrainTransform(crop_size, mean, std, **kwargs)
    if recipe == "paddlevit":
        return PaddleViTTrainTransform(crop_size, mean, std, **kwargs)
    raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")


def build_test_transform(test_scale: int, mean: Sequence[float], std: Sequence[float],
                         max_long_side: int | None = None, resize: str = "fit") -> TestTransform:
    return TestTransform(test_scale, mean, std, max_long_side, resize)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python's and NumPy's global RNGs from the
    worker's torch seed (base_seed + worker_id, with base_seed drawn from the loader's
    generator), so code that uses the global RNGs is reproducible too."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def loader_generator(seed: int, epoch: int = 0, rank: int = 0) -> torch.Generator:
    """Generator for a DataLoader's ``generator=``: sampler order and worker base seeds
    become a function of (seed, epoch, rank)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence((seed, epoch, rank)).generate_state(1, np.uint64)[0]) >> 1)
    return g
