"""Sliding-window inference with multi-scale+flip views, reproducing rstrudel/segmenter's
``inference`` (segm/model/utils.py) and, on request, MMSegmentation's low-resolution views."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.data.transforms import normalize, rescale_size, resize_test_image, short_side_size


def keep_freed_memory() -> bool:
    """Make glibc serve every allocation from its heap and keep what is freed there (mallopt
    M_MMAP_MAX 0, M_TRIM_THRESHOLD at its maximum), for a process that runs inference over and
    over: the logits maps (150 x window^2 floats and more) are otherwise fresh mmaps whose page
    faults cost more than the bilinear resizes writing them. False where libc has no mallopt."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def upsample_to_window(im: torch.Tensor, window: int) -> torch.Tensor:
    """Upsample a view whose short side is below the window so the short side equals it
    (reference ``resize``: the long side is ``int(ratio * window)``, truncated)."""
    h, w = im.shape[-2:]
    if min(h, w) >= window:
        return im
    if h < w:
        size = (window, int(w / h * window))
    else:
        size = (int(h / w * window), window)
    return F.interpolate(im, size, mode="bilinear", align_corners=False)


def window_origins(length: int, window: int, stride: int) -> list[int]:
    """Origins along one axis: every stride step that leaves a full window, then one window
    flush with the border (reference semantics)."""
    return [a for a in range(0, length, stride) if a < length - window] + [length - window]


def mmseg_origins(length: int, window: int, stride: int) -> list[int]:
    """MMSegmentation's ``slide_inference`` grid: ceil((length - window) / stride) + 1 steps,
    the last clamped to the border; a side shorter than the window gets one origin at 0."""
    n = max(length - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, length) - window, 0) for i in range(n)]


@torch.no_grad()
def slide_logits(model: nn.Module, im: torch.Tensor, window: int, stride: int, batch_size: int = 4,
                 small_views: str = "upsample") -> torch.Tensor:
    """Logits [C, H, W] of one view [1, 3, H, W]: windows batched through the model,
    overlapping logits averaged by count.

    ``upsample`` (reference): the view's sides must be at least the window.
    ``low_res`` (MMSegmentation): windows are clipped to a view smaller than the window.
    """
    _, _, H, W = im.shape
    if small_views == "upsample":
        ys, xs = window_origins(H, window, stride), window_origins(W, window, stride)
    else:
        ys, xs = mmseg_origins(H, window, stride), mmseg_origins(W, window, stride)
    wh, ww = min(window, H), min(window, W)
    anchors = [(y, x) for y in ys for x in xs]
    logits = torch.zeros((model.n_cls, H, W), device=im.device, dtype=torch.float32)
    for i in range(0, len(anchors), batch_size):
        batch = anchors[i:i + batch_size]
        out = model(torch.cat([im[:, :, y:y + wh, x:x + ww] for y, x in batch])).float()
        for seg, (y, x) in zip(out, batch):
            logits[:, y:y + wh, x:x + ww] += seg
    # The window count is the product of the per-axis counts and is 1 outside the overlaps:
    # dividing only the overlapping blocks, in place, gives the reference's logits / count.
    for y0, y1, ny in coverage(ys, wh, H):
        for x0, x1, nx in coverage(xs, ww, W):
            if ny * nx > 1:
                logits[:, y0:y1, x0:x1] /= ny * nx
    return logits


def coverage(origins: Sequence[int], size: int, length: int) -> list[tuple[int, int, int]]:
    """Runs ``(start, end, n)`` along one axis: how many windows of ``size`` at ``origins`` cover it."""
    cuts = sorted({0, length, *origins, *(a + size for a in origins)})
    return [(a, b, sum(o <= a < o + size for o in origins)) for a, b in zip(cuts, cuts[1:])]


@torch.no_grad()
def slide_inference(model: nn.Module, views: Sequence[torch.Tensor], flipped: Sequence[bool],
                    out_size: tuple[int, int], window: int, stride: int, batch_size: int = 4,
                    small_views: str = "upsample") -> torch.Tensor:
    """Class probabilities [C, *out_size]: the mean over views of the softmax of each view's
    sliding-window logits resized to ``out_size`` (bilinear) and mirrored back if flipped.

    ``small_views="upsample"`` is the reference (views below the window upsampled first);
    ``"low_res"`` runs them at their own resolution as MMSegmentation does.
    """
    if len(views) != len(flipped):
        raise ValueError(f"{len(views)} views but {len(flipped)} flip flags")
    # softmax commutes with the mirror: flipped views' probabilities are summed unmirrored and
    # mirrored once at the end, and the softmax writes into one reused buffer
    sums: dict[bool, torch.Tensor] = {}
    p = None
    for im, flip in zip(views, flipped):
        if small_views == "upsample":
            im = upsample_to_window(im, window)
        elif small_views != "low_res":
            raise ValueError(f"small_views must be 'upsample' or 'low_res', got {small_views!r}")
        logits = slide_logits(model, im, window, stride, batch_size, small_views)
        if tuple(logits.shape[-2:]) != tuple(out_size):  # at the same size the bilinear resize is the identity
            logits = F.interpolate(logits[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
        p = torch.softmax(logits, 0) if p is None else torch.softmax(logits, 0, out=p)
        if flip in sums:
            sums[flip] += p
        else:
            sums[flip], p = p, None
    probs = sums.get(False)
    if True in sums:
        mirrored = torch.flip(sums[True], dims=(2,))
        probs = mirrored if probs is None else probs.add_(mirrored)
    return probs.div_(len(views))


def view_size(h: int, w: int, test_scale: int, ratio: float = 1.0, resize: str = "fit",
              ratio_base: str = "test_scale") -> tuple[int, int]:
    """Size of the view at ``ratio`` of an HxW image.

    ``ratio_base="test_scale"`` (reference, MMSeg 0.x ``MultiScaleFlipAug``): the test resize at
    scale ``test_scale * ratio``: "fit" into (int(4 s r), int(s r)), i.e. (2048 r, 512 r), or
    "short_side" to int(s r) (PaddleViT's Resize, long side truncated, no cap).
    ``ratio_base="original"`` (MMSeg 1.x ``tta_pipeline``, Resize(scale_factor=r)): the original
    image scaled by r, rounded half up (mmcv ``_scale_size``).
    """
    if ratio_base == "original":
        return int(h * ratio + 0.5), int(w * ratio + 0.5)
    if resize == "short_side":
        return short_side_size(h, w, int(test_scale * ratio))
    return rescale_size(h, w, (int(4 * test_scale * ratio), int(test_scale * ratio)))


def make_views(image: torch.Tensor, test_scale: int, mean: Sequence[float], std: Sequence[float],
               scales: Sequence[float] = (1.0,), flip: bool = False, resize: str = "fit",
               ratio_base: str = "test_scale") -> tuple[list[torch.Tensor], list[bool]]:
    """Normalised views [1, 3, h, w] of a uint8 image [3, H, W]: for each ratio r the image
    resized to ``view_size`` (by default as MMSegmentation's ``MultiScaleFlipAug`` builds them
    for the reference: fit into (2048 r, 512 r) at test scale 512), normalised, then mirrored
    too if ``flip``."""
    views, flipped = [], []
    h, w = image.shape[-2:]
    for r in scales:
        size = view_size(h, w, test_scale, r, resize, ratio_base)
        v = normalize(resize_test_image(image, size, resize), mean, std)[None]
        views.append(v)
        flipped.append(False)
        if flip:
            views.append(torch.flip(v, dims=(3,)))
            flipped.append(True)
    return views, flipped
