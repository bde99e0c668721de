"""PaddleViT Segmenter checkpoints: a ``.pdparams`` (a pickle of numpy arrays, read without
paddle through an unpickler that admits numpy arrays only) with its yaml.

Names, layouts and computations follow shared/fixtures/paddlevit/README.md (PaddleViT
semantic_segmentation at 5ac7d89: backbones/vit.py, backbones/deit.py, decoders/segmentor_head.py,
segmentor.py, src/api/infer.py).
"""
from __future__ import annotations

import ast
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.config import NORMALIZATION, ConfigError, InputError, normalization_named, read_yaml, square_size

_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype")}
_PICKLE_PROTO = 0x80

# PaddleViT name -> reference name; every 2-D weight is a Paddle Linear stored [in, out] and is
# transposed, except the two mask projections (Paddle's x @ W is the reference's x @ P).
_RENAME = [
    (r"encoder\.transformer\.embeddings\.patch_embeddings\.", "encoder.patch_embed.proj."),
    (r"encoder\.transformer\.embeddings\.cls_token$", "encoder.cls_token"),
    (r"encoder\.transformer\.embeddings\.position_embeddings$", "encoder.pos_embed"),
    (r"encoder\.transformer\.encoder\.layers\.(\d+)\.", r"encoder.blocks.\1."),
    (r"encoder\.class_token$", "encoder.cls_token"),
    (r"encoder\.distill_token$", "encoder.dist_token"),
    (r"encoder\.layers\.(\d+)\.", r"encoder.blocks.\1."),
    (r"^norm\.", "encoder.norm."),
    (r"decoder\.proj_decoder\.", "decoder.proj_dec."),
    (r"decoder\.mask_tokens$", "decoder.cls_emb"),
    (r"decoder\.layers\.(\d+)\.", r"decoder.blocks.\1."),
    (r"decoder\.proj_patch\.weight$", "decoder.proj_patch"),
    (r"decoder\.proj_class\.weight$", "decoder.proj_classes"),
    (r"\.attn_norm\.", ".norm1."), (r"\.mlp_norm\.", ".norm2."), (r"\.attn\.out\.", ".attn.proj."),
]
_UNTRANSPOSED = ("decoder.proj_patch", "decoder.proj_classes")


class _Forbidden(pickle.UnpicklingError):
    """A global outside the numpy-array allowlist (as opposed to a truncated or corrupt pickle)."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the globals a .pdparams holds (numpy array reconstruction) and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise _Forbidden(f"{module}.{name} is not allowed in a .pdparams (numpy arrays only)")


def looks_like_pdparams(path: Path) -> bool:
    """A plain pickle, not torch's zip format: the content, not the name, decides."""
    with open(path, "rb") as f:
        head = f.read(1)
    return head == bytes([_PICKLE_PROTO]) and not zipfile.is_zipfile(path)


def read_pdparams(path: Path) -> dict[str, torch.Tensor] | None:
    """Paddle's state dict as torch tensors; None when the pickle is not a dict of arrays (a legacy
    torch file starts with an integer magic number). A forbidden global raises CheckpointError."""
    from harness.models.checkpoint import CheckpointError

    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f).load()
    except _Forbidden as e:
        raise CheckpointError(f"{path}: refused: {e}") from None
    except Exception as e:  # truncated or corrupt pickles of every kind
        raise CheckpointError(f"{path}: not a readable .pdparams ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        return None
    # "StructuredToParameterName@@" (and big-array split tables) are Paddle's bookkeeping
    state = {k: v for k, v in obj.items() if "@@" not in str(k)}
    bad = [str(k) for k, v in state.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise CheckpointError(f"{path}: expected numpy arrays, got other values for: {', '.join(bad)}")
    return {str(k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def _yacs_value(value: Any) -> Any:
    # yacs literal_evals string scalars: '(64,64)' -> tuple, '1e-4' -> float, 'None' -> None
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    if isinstance(value, dict):
        return {k: _yacs_value(v) for k, v in value.items()}
    return value


def find_config(path: Path, source_config: Path | None) -> tuple[dict, Path]:
    if source_config is not None:
        chosen = Path(source_config)
    else:
        beside = sorted(p for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml"))
        named = [p for p in beside if p.stem == path.stem]
        if not (named or len(beside) == 1):
            found = ", ".join(p.name for p in beside) or "none"
            raise InputError(f"{path}: a PaddleViT checkpoint needs its yaml (one .yaml beside it, or one named "
                             f"like it; found: {found}); pass it with --source-config")
        chosen = (named or beside)[0]
    return _yacs_value(read_yaml(chosen)), chosen


def _section(cfg: dict, name: str) -> dict:
    value = cfg.get(name) or {}
    return value if isinstance(value, dict) else {}


def _required(d: dict, key: str, file: Path, field: str) -> Any:
    if d.get(key) is None:
        raise ConfigError(file, field, "missing")
    return d[key]


def _val_normalization(val: dict, file: Path) -> str:
    # VAL.MEAN/STD default to ImageNet in PaddleViT's config.py (the DeiT yamls set none)
    return normalization_named(val.get("MEAN") or NORMALIZATION["deit"]["mean"],
                               val.get("STD") or NORMALIZATION["deit"]["std"], file, "VAL.MEAN")


def config_fields(state: dict, cfg: dict, file: Path) -> dict:
    """Model, data and eval fields of a segrepro Config: shapes from the state dict, heads and
    the evaluation protocol from the yaml (the checkpoint holds neither)."""
    model, data, val = _section(cfg, "MODEL"), _section(cfg, "DATA"), _section(cfg, "VAL")
    trans = _section(model, "TRANS")
    distilled = "encoder.distill_token" in state
    pos_key = "encoder.pos_embed" if distilled else "encoder.transformer.embeddings.position_embeddings"
    if pos_key not in state:
        raise ConfigError(file, "MODEL.ENCODER.TYPE", f"the checkpoint has no {pos_key}: expected a PaddleViT "
                                                      f"Segmenter with a ViT or DeiT encoder")
    d = int(state[pos_key].shape[-1])
    layers = {int(m.group(1)) for k in state for m in [re.match(r"encoder\.(?:transformer\.encoder\.)?layers\.(\d+)\.", k)] if m}
    fc1 = next(v for k, v in state.items() if k.startswith("encoder") and k.endswith("mlp.fc1.weight"))
    crop = square_size(_required(data, "CROP_SIZE", file, "DATA.CROP_SIZE"), file, "DATA.CROP_SIZE")
    heads = int(_required(trans, "NUM_HEADS", file, "MODEL.TRANS.NUM_HEADS"))
    if "decoder.mask_tokens" in state:
        dec_layers = {int(m.group(1)) for k in state for m in [re.match(r"decoder\.layers\.(\d+)\.", k)] if m}
        n_cls = int(state["decoder.mask_norm.weight"].shape[0])
        # the mask decoder's EncoderLayers are vit.py's: heads MODEL.TRANS.NUM_HEADS, eps 1e-6;
        # decoder_norm and mask_norm are Paddle's default LayerNorm, eps 1e-5
        decoder = {"name": "mask_transformer", "n_layers": max(dec_layers) + 1, "n_heads": heads,
                   "dropout": float(model.get("DROPOUT", 0.0)), "drop_path_rate": 0.0, "ln_eps": 1e-6, "norm_eps": 1e-5}
    elif "decoder.head.weight" in state:
        n_cls = int(state["decoder.head.weight"].shape[1])
        decoder = {"name": "linear"}
    else:
        raise ConfigError(file, "MODEL.DECODER_TYPE", "the checkpoint has neither decoder.mask_tokens (MaskTransformer) "
                                                      "nor decoder.head.weight (LinearDecoder)")
    m = {
        "backbone": "deit_paddlevit_distilled" if distilled else "vit_paddlevit",
        "patch_size": int(trans.get("PATCH_SIZE", 16)), "d_model": d, "n_layers": max(layers) + 1,
        "n_heads": heads, "mlp_ratio": fc1.shape[1] / d, "distilled": distilled, "image_size": crop, "n_cls": n_cls,
        "drop_path_rate": 0.0, "dropout": float(model.get("DROPOUT", 0.0)),
        # blocks 1e-6 (vit.py attn_norm/mlp_norm, deit.py norm1/norm2), the Segmentor's norm 1e-5
        "ln_eps": 1e-6, "final_norm_eps": 1e-5,
        # trained with ImageNet statistics for every model (src/transforms/__init__.py)
        "normalization": "deit",
        # the position embedding is added at its stored size: inputs must be DATA.CROP_SIZE
        "pos_embed_resize": "never", "logits_resize": "pad_crop", "decoder": decoder,
    }
    window = square_size(_required(val, "CROP_SIZE", file, "VAL.CROP_SIZE"), file, "VAL.CROP_SIZE")
    stride = square_size(_required(val, "STRIDE_SIZE", file, "VAL.STRIDE_SIZE"), file, "VAL.STRIDE_SIZE")
    ev = {"protocol": "paddlevit", "window": window, "stride": stride,
          "normalization": _val_normalization(val, file)}
    train = _section(cfg, "TRAIN")
    optim = {"iterations": int(train.get("ITERS", 160000))}
    data_fields = {"crop_size": crop, "test_scale": int(_required(val, "IMAGE_BASE_SIZE", file, "VAL.IMAGE_BASE_SIZE"))}
    return {"model": m, "data": data_fields, "eval": ev, "optim": optim}


def convert_state(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _RENAME:
            new = re.sub(pattern, repl, new)
        if value.ndim == 2 and new.endswith(".weight") and new not in _UNTRANSPOSED:
            value = value.t().contiguous()
        out[new] = value
    return out


def read(path: Path, state: dict, source_config: Path | None) -> tuple[dict, dict, str]:
    """(segrepro-named state dict, Config fields, the yaml it was read with)."""
    cfg, file = find_config(path, source_config)
    try:
        fields = config_fields(state, cfg, file)
    except ConfigError:
        raise
    except (TypeError, ValueError, StopIteration) as e:
        raise ConfigError(file, None, f"does not describe this checkpoint ({type(e).__name__}: {e})") from None
    return convert_state(state), fields, str(file)

