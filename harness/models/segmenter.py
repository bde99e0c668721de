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
    def __init__(self, encoder: VisionTransformer, decoder: nn.Module, n_cls: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.n_cls = n_cls
        self.patch_size = encoder.patch_size

    def forward(self, im: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_cls, H, W] for a normalised image batch [B, 3, H, W] of any size."""
        H, W = im.shape[-2:]
        im = pad_to_patch(im, self.patch_size)
        Hp, Wp = im.shape[-2:]
        x = self.encoder(im)[:, self.encoder.num_extra_tokens:]
        masks = self.decoder(x, (Hp, Wp))
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
        attention=cfg.attention,
    )
    dec = cfg.decoder
    if dec.name == "linear":
        decoder: nn.Module = DecoderLinear(cfg.n_cls, cfg.patch_size, cfg.d_model)
    else:
        # the reference's decoder width equals the encoder's, with 64-dim heads
        decoder = MaskTransformer(
            cfg.n_cls, cfg.patch_size, d_encoder=cfg.d_model, n_layers=dec.n_layers,
            n_heads=cfg.d_model // 64 or 1, d_model=cfg.d_model, mlp_ratio=cfg.mlp_ratio,
            drop_path_rate=dec.drop_path_rate, dropout=dec.dropout, ln_eps=cfg.ln_eps,
            attention=cfg.attention, mask_step=cfg.mask_step,
        )
    return Segmenter(encoder, decoder, cfg.n_cls)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
