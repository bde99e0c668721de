"""The Segmenter encoder: a ViT built from timm's blocks, reproducing rstrudel/segmenter's
``VisionTransformer`` (segm/model/vit.py) parameter for parameter and op for op."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Attention, Block


class SegAttention(Attention):
    """timm's attention with a switchable core: PyTorch SDPA or segrepro's Triton kernel."""

    backend = "torch"

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        # The Triton kernel has no mask and no dropout: those cases keep the torch path.
        dropping = self.training and self.attn_drop.p > 0
        if self.backend != "triton" or attn_mask is not None or is_causal or dropping:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        from kernels import attention

        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = attention(q.contiguous(), k.contiguous(), v.contiguous(), self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


def make_blocks(dim: int, depth: int, n_heads: int, mlp_ratio: float, dropout: float,
                drop_path_rate: float, ln_eps: float, attention: str) -> nn.ModuleList:
    """Pre-norm transformer blocks with drop-path rising linearly from 0, as the reference."""
    dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
    blocks = nn.ModuleList([
        Block(dim, n_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout,
              drop_path=dpr[i], norm_layer=partial(nn.LayerNorm, eps=ln_eps), attn_layer=SegAttention)
        for i in range(depth)
    ])
    for blk in blocks:
        blk.attn.backend = attention
    return blocks


class VisionTransformer(nn.Module):
    """ViT encoder returning all tokens ``[cls, (dist), patches]`` after the final norm.

    Holds the 1000-way ImageNet head (and ``head_dist``) as the reference does, so reference
    state dicts load strictly; segmentation never calls them.

    The sources' differences are options: ``ln_eps`` (blocks) and ``final_norm_eps`` (final
    norm; None = ln_eps): reference 1e-5/1e-5, MMSeg 1e-6/1e-6, PaddleViT 1e-6/1e-5.
    ``pos_embed_interp``: how the stored position grid is resized to another input grid
    (reference bilinear, MMSeg bicubic; align_corners False, extra tokens kept).
    ``pos_embed_resize``: "token_count" resizes only when the token count differs from the
    stored grid's, as both the reference and MMSeg do (a 2x8 input on a 4x4 grid uses the stored
    embedding as it is); "never" adds it at its stored size, as PaddleViT does, so any other
    input grid is an error.
    """

    def __init__(self, image_size: int, patch_size: int, n_layers: int, d_model: int, n_heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, drop_path_rate: float = 0.0,
                 distilled: bool = False, ln_eps: float = 1e-5, n_imagenet_cls: int = 1000,
                 attention: str = "torch", final_norm_eps: float | None = None,
                 pos_embed_interp: str = "bilinear", pos_embed_resize: str = "token_count"):
        super().__init__()
        if pos_embed_interp not in ("bilinear", "bicubic") or pos_embed_resize not in ("token_count", "never"):
            raise ValueError(f"unknown position-embedding option {pos_embed_interp!r} / {pos_embed_resize!r}")
        self.pos_embed_interp = pos_embed_interp
        self.pos_embed_resize = pos_embed_resize
        self.patch_size = patch_size
        self.distilled = distilled
        self.num_extra_tokens = 2 if distilled else 1
        self.d_model = d_model
        self.patch_embed = PatchEmbed(image_size, patch_size, 3, d_model, strict_img_size=False)
        self.grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d_model)) if distilled else None
        n_pos = self.grid_size[0] * self.grid_size[1] + self.num_extra_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, d_model))
        self.dropout = nn.Dropout(dropout)
        self.blocks = make_blocks(d_model, n_layers, n_heads, mlp_ratio, dropout, drop_path_rate, ln_eps, attention)
        self.norm = nn.LayerNorm(d_model, eps=ln_eps if final_norm_eps is None else final_norm_eps)
        self.head = nn.Linear(d_model, n_imagenet_cls)
        self.head_dist = nn.Linear(d_model, n_imagenet_cls) if distilled else None
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            if p is not None:
                trunc_normal_(p, std=0.02)
        self.apply(_init_weights)

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        B, _, H, W = im.shape
        x = self.patch_embed(im)
        extra = [self.cls_token.expand(B, -1, -1)]
        if self.dist_token is not None:
            extra.append(self.dist_token.expand(B, -1, -1))
        x = torch.cat(extra + [x], dim=1)
        pos_embed = self.pos_embed
        grid = (H // self.patch_size, W // self.patch_size)
        if x.shape[1] != pos_embed.shape[1]:
            if self.pos_embed_resize == "never":
                raise ValueError(f"input {H}x{W} gives a {grid[0]}x{grid[1]} patch grid; this model adds its "
                                 f"position embedding at the stored {self.grid_size[0]}x{self.grid_size[1]} grid "
                                 f"only (PaddleViT), so every window must be the training crop")
            # reference resize_pos_embed (bilinear) / MMSeg resize_pos_embed (bicubic)
            pos_embed = resample_abs_pos_embed(pos_embed, list(grid), list(self.grid_size),
                                               self.num_extra_tokens, interpolation=self.pos_embed_interp,
                                               antialias=False)
        x = self.dropout(x + pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def _init_weights(m: nn.Module) -> None:
    # the reference's init: truncated normal linears with zero bias, unit LayerNorms
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def pad_to_patch(im: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad bottom and right (in normalised space) to a multiple of the patch."""
    H, W = im.shape[-2:]
    pad_h, pad_w = -H % patch_size, -W % patch_size
    if pad_h or pad_w:
        im = F.pad(im, (0, pad_w, 0, pad_h), value=0.0)
    return im
