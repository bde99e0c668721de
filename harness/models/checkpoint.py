"""Checkpoints: reference run directories, segrepro's own files, MMSegmentation and PaddleViT
checkpoints (harness/models/mmseg.py, harness/models/paddlevit.py), and timm ImageNet backbones."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml
from timm.layers import resample_abs_pos_embed

from harness.atomic import atomic_path
from harness.config import (Config, ConfigError, InputError, config_from_dict, deep_merge, load_config,
                            recipe_overrides, released_rows, zoo_names)
from harness.models.segmenter import Segmenter, build_model

SEGREPRO_FORMAT = "segrepro-checkpoint"


class CheckpointError(InputError):
    """A checkpoint that does not fit: names the file and every mismatching key."""


class _VariantLoader(yaml.SafeLoader):
    """Safe YAML that also reads the ``!!python/tuple`` the reference writes into variant.yml
    (as a plain tuple: no arbitrary Python is constructed)."""


_VariantLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple",
    lambda loader, node: tuple(loader.construct_sequence(node, deep=True)),
)


def read_variant(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_VariantLoader)
    except yaml.YAMLError as e:
        raise ConfigError(path, None, f"malformed YAML: {e}") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("net_kwargs"), dict):
        raise ConfigError(path, "net_kwargs", "expected a reference variant.yml with a net_kwargs mapping")
    return data


# timm's optimizer names as the reference passes them (timm.optim.create_optimizer): "sgd" and
# "nesterov" are SGD with Nesterov momentum, "momentum" is plain momentum.
_VARIANT_NESTEROV = {"sgd": True, "nesterov": True, "momentum": False}


def config_from_variant(variant: dict, name: str, file: Any = None) -> Config:
    """A segrepro Config for a reference run: architecture from ``net_kwargs``, window and
    stride from ``inference_kwargs``, the schedule from ``optimizer_kwargs``, the precision from
    ``amp`` (the reference's ``--amp`` is fp16 autocast with a loss scaler)."""
    net = variant["net_kwargs"]
    try:
        size = net["image_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if h != w:
            raise ConfigError(file, "net_kwargs.image_size", f"expected a square size, got {size!r}")
        dec = dict(net["decoder"])
        decoder = {"name": dec["name"]}
        if dec["name"] == "mask_transformer":
            decoder.update(n_layers=dec["n_layers"], dropout=dec.get("dropout", 0.0),
                           drop_path_rate=dec.get("drop_path_rate", 0.0))
    except KeyError as e:
        raise ConfigError(file, f"net_kwargs.{e.args[0]}", "missing") from None
    inf = variant.get("inference_kwargs", {})
    data = variant.get("dataset_kwargs", {})
    algo = variant.get("algorithm_kwargs", {})
    opt = variant.get("optimizer_kwargs", {})
    iterations = opt.get("iter_max", 161728)
    epochs = opt.get("epochs") or algo.get("num_epochs")
    optim = {
        "iterations": iterations,
        "batch_size": variant.get("world_batch_size", algo.get("batch_size", data.get("batch_size", 8))),
        "lr": opt.get("lr", 1e-3), "momentum": opt.get("momentum", 0.9),
        "nesterov": _variant_nesterov(opt.get("opt", "sgd"), file),
        "weight_decay": opt.get("weight_decay", 0.0), "poly_power": opt.get("poly_power", 0.9),
        "min_lr": opt.get("min_lr", 1e-5), "warmup_iterations": int(opt.get("iter_warmup", 0)),
        "poly_step_size": opt.get("poly_step_size", 1), "clip_grad": opt.get("clip_grad"),
        "amp": _variant_amp(variant.get("amp", False), file),
    }
    if opt.get("sched", "polynomial") != "polynomial":
        raise ConfigError(file, "optimizer_kwargs.sched", f"expected 'polynomial', got {opt['sched']!r}")
    if epochs and algo.get("eval_freq"):
        # the reference evaluates every eval_freq epochs of iter_max / epochs iterations
        optim["eval_interval"] = max(1, algo["eval_freq"] * iterations // epochs)
    cfg = {
        "name": name,
        "description": f"reference run {name} (variant.yml)",
        "model": {
            "backbone": net["backbone"], "patch_size": net["patch_size"], "d_model": net["d_model"],
            "n_layers": net["n_layers"], "n_heads": net["n_heads"],
            "distilled": bool(net.get("distilled", False)), "image_size": h, "n_cls": net["n_cls"],
            "drop_path_rate": net.get("drop_path_rate", 0.0), "dropout": net.get("dropout", 0.0),
            "ln_eps": 1e-5, "normalization": net.get("normalization", "vit"), "decoder": decoder,
        },
        "data": {"crop_size": data.get("crop_size", h), "test_scale": inf.get("im_size", h)},
        "optim": optim,
        "eval": {"window": inf.get("window_size", h), "stride": inf.get("window_stride", h), "train_stride": "window"},
    }
    return config_from_dict(cfg, file)


def _variant_nesterov(opt: Any, file: Any) -> bool:
    if opt not in _VARIANT_NESTEROV:
        raise ConfigError(file, "optimizer_kwargs.opt", f"expected one of {', '.join(_VARIANT_NESTEROV)}, got {opt!r}")
    return _VARIANT_NESTEROV[opt]


def _variant_amp(amp: Any, file: Any) -> str:
    if not isinstance(amp, bool):
        raise ConfigError(file, "amp", f"expected true or false, got {amp!r}")
    return "fp16" if amp else "fp32"


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # unpickling errors of every kind: one message naming the file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None


def load_state_dict_strict(module: nn.Module, state: dict, source: Any, ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``, raising one CheckpointError that lists every missing
    key, unexpected key and shape mismatch (keys starting with ``ignore`` may be absent)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(ignore)]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"{source}: the checkpoint does not fit the model"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=False)


def _checkpoint_file(path: Path) -> Path:
    """A directory names its checkpoint.pth / checkpoint.pt, else its one .pth or .pdparams."""
    if path.is_dir():
        found = [c for c in (path / "checkpoint.pth", path / "checkpoint.pt") if c.is_file()]
        found = found or sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pdparams"))
        if len(found) != 1 and not (found and found[0].stem == "checkpoint"):
            raise CheckpointError(f"{path}: no checkpoint.pth or checkpoint.pt in this directory, and "
                                  f"{len(found)} .pth/.pdparams files instead of one")
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    return path


_ARCH = ("patch_size", "d_model", "n_layers", "n_heads", "distilled", "image_size", "n_cls")


def _zoo_row(model: dict) -> tuple[str, str] | None:
    """(documented row, its backbone) with the architecture of a source's checkpoint, if any: a
    zoo configuration, or a row only a source released (experiments/released.yaml)."""
    rows = {name: load_config(name).model for name in zoo_names()} | released_rows()
    for name, row in rows.items():
        if all(getattr(row, k) == model.get(k, False if k == "distilled" else None) for k in _ARCH) \
                and row.decoder.name == model["decoder"]["name"]:
            return name, row.backbone
    return None


def _source_config(source: str, path: Path, fields: dict, where: str) -> Config:
    """A source checkpoint's Config: its recipe (experiments/recipes/SOURCE.yaml, which holds the
    source's protocol rules) under what the checkpoint and its config file say."""
    row = _zoo_row(fields["model"])
    name = row[0] if row else (path.parent.name if path.stem in ("checkpoint", "model") else path.stem)
    model = {**fields["model"], "backbone": row[1]} if row else {"backbone": f"vit_{source}", **fields["model"]}
    base = {"optim": {"batch_size": 8}}
    merged = deep_merge(deep_merge(base, recipe_overrides(source)), {**fields, "model": model})
    merged.update(name=name, description=f"{source} checkpoint {path} (config: {where})", recipe=source,
                  source=source)
    return config_from_dict(merged, where)


def _read_source(source: str, read, path: Path, state: Any, source_config) -> tuple[dict, Config]:
    try:
        converted, fields, where = read(path, state, source_config)
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        kind = {"mmseg": "an MMSeg", "paddlevit": "a PaddleViT"}[source]
        raise CheckpointError(f"{path}: not {kind} Segmenter checkpoint segrepro can read "
                              f"({type(e).__name__}: {e})") from None
    return converted, _source_config(source, path, fields, where)


def load_checkpoint(path: str | os.PathLike, source_config: str | os.PathLike | None = None,
                    **model_overrides: Any) -> tuple[Segmenter, Config]:
    """``(model, config)`` from any checkpoint segrepro reads, recognised by its content:

    - a reference run directory, or its checkpoint.pth with variant.yml beside it;
    - a segrepro checkpoint;
    - an MMSeg checkpoint (a dict whose ``state_dict`` holds ``backbone.*``) with the config
      MMSeg dumps beside it (or ``source_config``, or the config text in its ``meta``);
    - a PaddleViT ``.pdparams`` (a pickle of numpy arrays) with its yaml beside it (or
      ``source_config``).

    The model computes what the source's own code computes (its options set from the source's
    config) and is in eval mode; ``config.source`` names the source and ``config.eval`` carries
    its evaluation protocol. ``model_overrides`` replace model fields that do not change the
    weights (``attention``, ``mask_step``).
    """
    from harness.models import mmseg, paddlevit

    path = _checkpoint_file(Path(path))
    source_config = Path(source_config) if source_config is not None else None
    # MMSeg and PaddleViT have no ImageNet head; segmentation never uses the reference's
    ignore: tuple[str, ...] = ("encoder.head.", "encoder.head_dist.")
    pd_state = paddlevit.read_pdparams(path) if paddlevit.looks_like_pdparams(path) else None
    if pd_state is not None:
        state, cfg = _read_source("paddlevit", paddlevit.read, path, pd_state, source_config)
    else:
        ckpt = _torch_load(path)
        if mmseg.is_mmseg(ckpt):
            state, cfg = _read_source("mmseg", mmseg.read, path, ckpt, source_config)
        elif not isinstance(ckpt, dict) or "model" not in ckpt:
            raise CheckpointError(f"{path}: expected a dict with a 'model' state dict (reference or segrepro), "
                                  f"a 'state_dict' of backbone.*/decode_head.* weights (MMSeg), or a .pdparams")
        else:
            state, ignore = ckpt["model"], ()
            if ckpt.get("format") == SEGREPRO_FORMAT:
                cfg = config_from_dict(ckpt["config"], path)
            else:
                variant = path.parent / "variant.yml"
                if not variant.is_file():
                    raise CheckpointError(f"{path}: a reference checkpoint needs its variant.yml beside it "
                                          f"({variant} is missing)")
                cfg = config_from_variant(read_variant(variant), path.parent.name, variant)
                cfg = dataclasses.replace(cfg, source="reference")
    if model_overrides:
        cfg = config_from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], **model_overrides}}, path)
    model = build_model(cfg.model)
    load_state_dict_strict(model, state, path, ignore=ignore)
    return model.eval(), cfg


def save_model_checkpoint(path: str | os.PathLike, model: nn.Module, cfg: Config, **extra: Any) -> None:
    """Write a segrepro checkpoint atomically (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        torch.save({"format": SEGREPRO_FORMAT, "config": cfg.to_dict(), "model": model.state_dict(), **extra}, tmp)


def load_backbone_weights(model: Segmenter, file: str | os.PathLike, backbone: str) -> None:
    """Initialise the encoder from a local timm ImageNet checkpoint of ``backbone``.

    timm reads the file (pth, safetensors or npz) into its own model; its weights are then
    copied with the position grid resized bilinearly to the training grid, as the reference's
    ``checkpoint_filter_fn`` does (24x24 -> 32x32 for 384 checkpoints at 512), the class (and
    distillation) tokens kept as they are. A backbone timm does not know (the reference's own
    ``vit_base_patch8_384``) is read as a plain state dict in timm's ViT layout.
    The ImageNet heads may differ in size (21k checkpoints): they are unused and skipped.
    """
    import timm

    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such backbone weights file")
    try:
        if backbone in timm.list_models():
            src = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": str(file)}).state_dict()
        else:
            src = timm.models.load_state_dict(str(file))
    except Exception as e:
        raise CheckpointError(f"{file}: timm could not load it as {backbone}: {type(e).__name__}: {e}") from None
    enc = model.encoder
    own = enc.state_dict()
    state = {k: v for k, v in src.items()
             if not (k.startswith(("head.", "head_dist.")) and k in own and own[k].shape != v.shape)}
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != enc.pos_embed.shape:
        old = int((pos.shape[1] - enc.num_extra_tokens) ** 0.5)
        state["pos_embed"] = resample_abs_pos_embed(pos, list(enc.grid_size), [old, old], enc.num_extra_tokens,
                                                    interpolation="bilinear", antialias=False)
    load_state_dict_strict(enc, state, file, ignore=("head.", "head_dist."))
