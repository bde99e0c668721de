"""Segmenter decoders: linear and mask transformer, reproducing rstrudel/segmenter's
``DecoderLinear`` and ``MaskTransformer`` (segm/model/decoder.py)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from harness.models.vit import _init_weights, make_blocks


class DecoderLinear(nn.Module):
    """One Linear(d_encoder -> n_cls) per patch token, reshaped to the patch grid."""

    def __init__(self, n_cls: int, patch_size: int, d_encoder: int):
        super().__init__()
        self.n_cls = n_cls
        self.patch_size = patch_size
        self.head = nn.Linear(d_encoder, n_cls)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, im_size: tuple[int, int]) -> torch.Tensor:
        gh, gw = im_size[0] // self.patch_size, im_size[1] // self.patch_size
        x = self.head(x)
        return x.transpose(1, 2).reshape(x.shape[0], self.n_cls, gh, gw)


class MaskTransformer(nn.Module):
    """Class embeddings decoded jointly with the patch tokens; masks are the LayerNorm'd
    cosine similarities between projected patches and projected class embeddings.

    ``ln_eps`` is the blocks' LayerNorm eps, ``norm_eps`` that of ``decoder_norm`` and
    ``mask_norm`` (None = ln_eps): reference 1e-5/1e-5, MMSeg's head 1e-5/1e-5, PaddleViT
    1e-6/1e-5.
    """

    def __init__(self, n_cls: int, patch_size: int, d_encoder: int, n_layers: int, n_heads: int,
                 d_model: int, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 dropout: float = 0.1, ln_eps: float = 1e-5, attention: str = "torch",
                 mask_step: str = "torch", norm_eps: float | None = None):
        super().__init__()
        self.n_cls = n_cls
        self.patch_size = patch_size
        self.mask_step = mask_step
        self.blocks = make_blocks(d_model, n_layers, n_heads, mlp_ratio, dropout, drop_path_rate, ln_eps, attention)
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        self.proj_dec = nn.Linear(d_encoder, d_model)
        # raw d x d matrices used as x @ P, as the reference stores them
        self.proj_patch = nn.Parameter(d_model ** -0.5 * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(d_model ** -0.5 * torch.randn(d_model, d_model))
        norm_eps = ln_eps if norm_eps is None else norm_eps
        self.decoder_norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.mask_norm = nn.LayerNorm(n_cls, eps=norm_eps)
        self.apply(_init_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, x: torch.Tensor, im_size: tuple[int, int]) -> torch.Tensor:
        gh, gw = im_size[0] // self.patch_size, im_size[1] // self.patch_size
        x = self.proj_dec(x)
        x = torch.cat((x, self.cls_emb.expand(x.shape[0], -1, -1)), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches = x[:, : -self.n_cls] @ self.proj_patch
        classes = x[:, -self.n_cls:] @ self.proj_classes
        if self.mask_step == "triton":
            from kernels import mask_logits

            masks = mask_logits(patches, classes, self.mask_norm.weight, self.mask_norm.bias,
                                self.mask_norm.eps)
        else:
            # no epsilon in the norms: the reference divides by the bare L2 norm
            patches = patches / patches.norm(dim=-1, keepdim=True)
            classes = classes / classes.norm(dim=-1, keepdim=True)
            masks = F.layer_norm(patches @ classes.transpose(1, 2), (self.n_cls,),
                                 self.mask_norm.weight, self.mask_norm.bias, self.mask_norm.eps)
        return masks.transpose(1, 2).reshape(x.shape[0], self.n_cls, gh, gw)
