"""PyTorch references the Triton kernels are tested and profiled against.

Both functions are written the way the reference Segmenter (rstrudel/segmenter) computes them,
so a difference between a kernel and its reference is a kernel error, not a modelling choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v over [B, H, N, D] tensors, in fp32 math.

    The result is cast back to q's dtype, as the kernel returns it. Reproduces segmenter's
    `Attention.forward` (timm ViT): `attn = (q @ k.transpose(-2, -1)) * scale; attn.softmax(-1)`.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (s.softmax(dim=-1) @ v.float()).to(q.dtype)


def mask_logits_reference(
    patches: torch.Tensor,
    classes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The Segmenter mask step, [B, N, D] x [B, C, D] -> [B, N, C], exactly as the reference.

    segmenter/model/decoder.py (MaskTransformer.forward): L2-normalise without an epsilon
    (a zero vector gives NaN), product, LayerNorm over the class dimension. Computed in the
    inputs' dtype, like the reference; pass fp32 copies for an fp32-math comparison.
    """
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    masks = patches @ classes.transpose(1, 2)
    return F.layer_norm(masks, (masks.shape[-1],), weight, bias, eps)
