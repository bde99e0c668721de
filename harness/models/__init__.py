"""Segmenter models: the ViT encoder, the decoders, and checkpoint loading."""
from harness.models.checkpoint import (CheckpointError, load_backbone_weights, load_checkpoint,
                                       save_model_checkpoint)
from harness.models.segmenter import Segmenter, build_model, count_parameters

__all__ = ["Segmenter", "build_model", "count_parameters", "load_checkpoint", "save_model_checkpoint",
           "load_backbone_weights", "CheckpointError"]
