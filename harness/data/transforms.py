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

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageEnhance

IGNORE_INDEX = 255
BILINEAR = F.InterpolationMode.BILINEAR
NEAREST = F.InterpolationMode.NEAREST

RECIPES = ("reference", "mmseg", "paddlevit")


def _as_rng(rng) -> np.random.Generator:
    if hasattr(rng, "integers"):
        # a numpy Generator, or anything drawing like one (tests replay MMSeg's legacy
        # np.random stream through such an object)
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
# Both recipes run mmcv's transforms (the reference through MMSeg 0.x, "mmseg" through 1.2.2;
# same arithmetic). They are reproduced on HxWx3 uint8 numpy arrays with the same OpenCV calls,
# so the pixels are mmcv's exactly (tests/data/fixtures/mmseg_pipeline). The image stays RGB:
# every step is channel-order agnostic except HSV, where COLOR_RGB2HSV on RGB equals mmcv's
# bgr2hsv (COLOR_BGR2HSV) on BGR.

def _convert_lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """PhotoMetricDistortion.convert (float32 x alpha + beta, clip to 0..255, astype uint8:
    truncation) evaluated on every uint8 value, so cv2.LUT applies it exactly."""
    v = np.arange(256, dtype=np.float32)
    return np.clip(v * alpha + beta, 0, 255).astype(np.uint8)


def _hsv_lut(channel: int, lut: np.ndarray) -> np.ndarray:
    # 3-channel LUT for cv2.LUT: ``lut`` on one HSV channel, identity on the others.
    out = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    out[:, channel] = lut
    return out[None]


def _hsv_step(img: np.ndarray, channel: int, lut: np.ndarray) -> np.ndarray:
    # mmcv.bgr2hsv -> one channel changed -> mmcv.hsv2bgr (uint8 HSV, H in 0..179).
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    return cv2.cvtColor(cv2.LUT(hsv, _hsv_lut(channel, lut)), cv2.COLOR_HSV2RGB)


def photometric_distortion(img: np.ndarray, rng) -> np.ndarray:
    """MMSeg PhotoMetricDistortion (0.x and 1.2.2) on an RGB uint8 HxWx3 array.

    Draws in MMSeg's order: brightness (randint(2), then beta ~ U(-32, 32)), mode = randint(2),
    contrast first if mode == 1 (alpha ~ U(0.5, 1.5)), saturation (S x U(0.5, 1.5)), hue
    (H + randint(-18, 18), mod 180, upper bound excluded as numpy's randint does), contrast
    last if mode == 0. Each step with probability 0.5, uint8 in between.
    """
    rng = _as_rng(rng)

    def contrast(x):
        return cv2.LUT(x, _convert_lut(alpha=rng.uniform(0.5, 1.5))) if rng.integers(2) else x

    if rng.integers(2):
        img = cv2.LUT(img, _convert_lut(beta=rng.uniform(-32, 32)))
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):
        img = _hsv_step(img, 1, _convert_lut(alpha=rng.uniform(0.5, 1.5)))
    if rng.integers(2):
        delta = int(rng.integers(-18, 18))
        img = _hsv_step(img, 0, ((np.arange(256) + delta) % 180).astype(np.uint8))
    if mode == 0:
        img = contrast(img)
    return img


def _normalize_hwc(img: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 HxWx3 -> float32 3xHxW (x - mean) / std, in place on one buffer: MMSeg 1.x's
    SegDataPreProcessor. The reference's MMSeg 0.x Normalize (mmcv.imnormalize: cv2.subtract of
    the float32 mean, cv2.multiply by 1 / std in double) gives the same values (the parity test
    checks both)."""
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
    return x.sub_(torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)).div_(
        torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))


class MMSegTrainTransform:
    """Reference (OFF) = MMSegmentation ADE20K training pipeline, reimplemented:

    Resize(img_scale=scale, ratio_range, keep_ratio=True) -> RandomCrop(crop,
    cat_max_ratio) -> RandomFlip(0.5) -> PhotoMetricDistortion -> Normalize ->
    Pad(crop, pad_val=0, seg_pad_val=255). Bilinear for the image, nearest for the label,
    both cv2.resize as mmcv.imrescale calls it.
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
        img, lab = self.augment(image, label, rng)
        img = _normalize_hwc(img, self.mean, self.std)
        lab = torch.from_numpy(np.ascontiguousarray(lab))
        ch, cw = self.crop
        h, w = lab.shape
        if h < ch or w < cw:
            # MMSeg pads after normalising, bottom/right only: image 0, label 255.
            img = torch.nn.functional.pad(img, (0, max(cw - w, 0), 0, max(ch - h, 0)), value=0.0)
            lab = torch.nn.functional.pad(lab, (0, max(cw - w, 0), 0, max(ch - h, 0)), value=IGNORE_INDEX)
        return img, lab.long()

    def augment(self, image: np.ndarray, label: np.ndarray, rng=None) -> tuple[np.ndarray, np.ndarray]:
        """Resize, crop, flip and photometric distortion: uint8 HxWx3 RGB and HxW label, before
        normalisation and padding (what MMSeg's pipeline hands to its data preprocessor)."""
        rng = _as_rng(rng)
        img, lab = self._resize(image, label, rng)
        y0, y1, x0, x1 = self._crop_box(lab, rng)
        img, lab = img[y0:y1, x0:x1], lab[y0:y1, x0:x1]
        if rng.random() < self.flip_prob:
            img, lab = cv2.flip(img, 1), cv2.flip(lab, 1)
        if self.photometric:
            img = photometric_distortion(np.ascontiguousarray(img), rng)
        return img, lab

    def _resize(self, img, lab, rng):
        # MMSeg Resize.random_sample_ratio / mmcv RandomResize: r ~ U(lo, hi), target
        # (int(2048 r), int(512 r)); then mmcv.imrescale (cv2.resize, INTER_LINEAR without
        # antialiasing for the image, INTER_NEAREST for the label).
        lo, hi = self.ratio_range
        r = rng.random() * (hi - lo) + lo
        target = (int(self.scale[0] * r), int(self.scale[1] * r))
        h, w = rescale_size(img.shape[0], img.shape[1], target)
        if (h, w) == img.shape[:2]:
            return img, lab
        return (cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR),
                cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST))

    def _draw_box(self, h, w, rng):
        ch, cw = self.crop
        y = int(rng.integers(0, max(h - ch, 0) + 1))
        x = int(rng.integers(0, max(w - cw, 0) + 1))
        return y, y + ch, x, x + cw

    def _crop_box(self, lab, rng):
        # MMSeg RandomCrop: redraw the box up to crop_tries times while one class covers
        # >= cat_max_ratio of the labelled pixels of the crop or fewer than 2 classes are
        # present; after the last failed try the next drawn box is used unchecked.
        h, w = lab.shape
        box = self._draw_box(h, w, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.crop_tries):
                y0, y1, x0, x1 = box
                # cv2.calcHist counts uint8 values far faster than np.unique / np.bincount.
                hist = cv2.calcHist([lab[y0:y1, x0:x1]], [0], None, [256], [0, 256])
                counts = hist[:IGNORE_INDEX, 0].astype(np.int64)
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._draw_box(h, w, rng)
        return box


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
        lo, hi = self.scale_range
        s = rng.random() * (hi - lo) + lo
        h, w = image.shape[:2]
        oh, ow = (round(s * w), round(s * h)) if self.swap_hw else (round(s * h), round(s * w))
        # PaddleViT resizes the float32 image (cv2 reads float), so no uint8 rounding here;
        # the same cv2.resize calls as paddle's functional_cv2.resize.
        img = cv2.resize(image.astype(np.float32), (ow, oh), interpolation=cv2.INTER_LINEAR)
        lab = cv2.resize(label, (ow, oh), interpolation=cv2.INTER_NEAREST)
        img, lab = _to_tensors(img, lab)
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
    generator), so code that uses the global RNGs is reproducible too; OpenCV single-threaded."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
    # One thread per worker, as torch does in workers and mmengine does for OpenCV
    # (env_cfg opencv_num_threads=0): the workers are the parallelism.
    cv2.setNumThreads(0)


def loader_generator(seed: int, epoch: int = 0, rank: int = 0) -> torch.Generator:
    """Generator for a DataLoader's ``generator=``: sampler order and worker base seeds
    become a function of (seed, epoch, rank)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence((seed, epoch, rank)).generate_state(1, np.uint64)[0]) >> 1)
    return g
