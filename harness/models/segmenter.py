"""Segmenter: encoder + decoder + upsampling, as rstrudel/segmenter's ``Segmenter``
(segm/model/segmenter.py), built from a ``ModelConfig``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.config import ModelConfig
from harness.models.decoders import DecoderLinear, MaskTransformer
from harness.models.vit import VisionTransformer, pad_to_patch


class Segmenter(nn.Module):
    """``logits_resize`` says how the patch-grid logits return to the input size (both bilinear,
    align_corners False): "pad_crop" upsamples to the padded size and crops (reference;
    PaddleViT, whose inputs are never padded), "direct" resizes straight to the unpadded size
    (MMSeg's ``decode_head.predict`` to ``img_shape``)."""

    def __init__(self, encoder: VisionTransformer, decoder: nn.Module, n_cls: int, logits_resize: str = "pad_crop"):
        super().__init__()
        if logits_resize not in ("pad_crop", "direct"):
            raise ValueError(f"logits_resize must be 'pad_crop' or 'direct', got {logits_resize!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.n_cls = n_cls
        self.patch_size = encoder.patch_size
        self.logits_resize = logits_resize

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_cls, H, W] for a normalised image batch [B, 3, H, W] of any size."""
        H, W = im.shape[-2:]
        im = pad_to_patch(im, self.patch_size)
        Hp, Wp = im.shape[-2:]
        x = self.encoder(im)[:, self.encoder.num_extra_tokens:]
        # The decoders' [B, N, C] -> [B, C, h, w] views have channels-last strides (degenerate
        # batch stride at B=1) which send the bilinear upsample down a slow path with a full-size
        # copy; a contiguous copy of the small patch-grid logits costs nothing and is exact.
        masks = self.decoder(x, (Hp, Wp)).contiguous()
        if self.logits_resize == "direct":
            return F.interpolate(masks, size=(H, W), mode="bilinear", align_corners=False)
        masks = F.interpolate(masks, size=(Hp, Wp), mode="bilinear", align_corners=False)
        return masks[:, :, :H, :W]

    def decoder_parameters(self) -> list[nn.Parameter]:
        return list(self.decoder.parameters())

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())


def build_model(cfg: ModelConfig) -> Segmenter:
    encoder = VisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, n_layers=cfg.n_layers,
        d_model=cfg.d_model, n_heads=cfg.n_heads, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
        drop_path_rate=cfg.drop_path_rate, distilled=cfg.distilled, ln_eps=cfg.ln_eps,
        attention=cfg.attention, final_norm_eps=cfg.final_norm_eps, pos_embed_interp=cfg.pos_embed_interp,
        pos_embed_resize=cfg.pos_embed_resize,
    )
    dec = cfg.decoder
    if dec.name == "linear":
        decoder: nn.Module = DecoderLinear(cfg.n_cls, cfg.patch_size, cfg.d_model)
    else:
        # the reference's decoder width equals the encoder's, with 64-dim heads unless set
        decoder = MaskTransformer(
            cfg.n_cls, cfg.patch_size, d_encoder=cfg.d_model, n_layers=dec.n_layers,
            n_heads=dec.n_heads or cfg.d_model // 64 or 1, d_model=cfg.d_model, mlp_ratio=cfg.mlp_ratio,
            drop_path_rate=dec.drop_path_rate, dropout=dec.dropout,
            ln_eps=cfg.ln_eps if dec.ln_eps is None else dec.ln_eps, attention=cfg.attention,
            mask_step=cfg.mask_step, norm_eps=dec.norm_eps,
        )
    return Segmenter(encoder, decoder, cfg.n_cls, cfg.logits_resize)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
