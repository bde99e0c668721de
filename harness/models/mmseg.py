"""MMSegmentation Segmenter checkpoints: the ``state_dict`` of an mmengine (1.x) or mmcv (0.x)
checkpoint, with the config MMSeg dumps beside it, read without executing it.

Names, layouts and computations follow shared/fixtures/mmseg/README.md (MMSeg 1.2.2's
``VisionTransformer``, ``SegmenterMaskTransformerHead`` and ``FCNHead(num_convs=0)``).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any


from harness.config import ConfigError, InputError, normalization_named, square_size

# MMSeg key pattern -> reference key template (shared/fixtures/mmseg/README.md's table)
_BLOCK = {"ln1": "norm1", "ln2": "norm2", "attn.attn.in_proj_weight": "attn.qkv.weight",
          "attn.attn.in_proj_bias": "attn.qkv.bias", "attn.attn.out_proj": "attn.proj",
          "ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"}
_TOP = {"backbone.cls_token": "encoder.cls_token", "backbone.pos_embed": "encoder.pos_embed",
        "backbone.patch_embed.projection": "encoder.patch_embed.proj", "backbone.ln1": "encoder.norm",
        "decode_head.cls_emb": "decoder.cls_emb", "decode_head.dec_proj": "decoder.proj_dec",
        "decode_head.decoder_norm": "decoder.decoder_norm", "decode_head.mask_norm": "decoder.mask_norm",
        "decode_head.conv_seg": "decoder.head"}
_LAYER = re.compile(r"^(backbone|decode_head)\.layers\.(\d+)\.(.+)$")


def is_mmseg(ckpt: Any) -> bool:
    """An MMSeg checkpoint: a dict whose ``state_dict`` holds ``backbone.*`` weights."""
    return (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)
            and any(str(k).startswith("backbone.") for k in ckpt["state_dict"]))


def _literal(node: ast.AST, file: Any) -> Any:
    """A literal of a dumped config: constants, lists, tuples, dicts and ``dict(k=v, ...)``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e, file) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_literal(k, file): _literal(v, file) for k, v in zip(node.keys, node.values)}
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"
            and not node.args and all(k.arg for k in node.keywords)):
        return {k.arg: _literal(k.value, file) for k in node.keywords}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, file)
        if isinstance(value, (int, float)):
            return -value if isinstance(node.op, ast.USub) else value
    raise ConfigError(file, None, f"line {node.lineno}: expected a literal (what Config.dump writes), "
                                        f"got {ast.unparse(node)[:80]!r}")


def read_config_text(text: str, file: Any) -> dict:
    """The top-level assignments of a dumped MMSeg config, evaluated as literals only."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise ConfigError(file, None, f"not a Python config (line {e.lineno}: {e.msg})") from None
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            out[stmt.targets[0].id] = _literal(stmt.value, file)
        elif not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            raise ConfigError(file, None, f"line {stmt.lineno}: expected 'name = literal' assignments only")
    return out


def find_config(path: Path, ckpt: dict, source_config: Path | None) -> tuple[dict, str]:
    """The config of an MMSeg checkpoint: ``source_config``, else the one ``.py`` beside it (or
    the one named like it), else the config text the checkpoint's ``meta`` holds."""
    if source_config is not None:
        try:
            return read_config_text(Path(source_config).read_text(), source_config), str(source_config)
        except OSError as e:
            raise InputError(f"--source-config {source_config}: cannot read ({e.strerror or e})") from None
    beside = sorted(path.parent.glob("*.py"))
    named = [p for p in beside if p.stem == path.stem]
    chosen = named or (beside if len(beside) == 1 else [])
    if chosen:
        return read_config_text(chosen[0].read_text(), chosen[0]), str(chosen[0])
    meta = ckpt.get("meta") or {}
    text = meta.get("cfg") or meta.get("config") if isinstance(meta, dict) else None
    if isinstance(text, str):
        return read_config_text(text, f"{path} (meta config)"), f"{path} meta"
    found = f"{len(beside)} .py files ({', '.join(p.name for p in beside)})" if beside else "no .py file"
    raise InputError(f"{path}: an MMSeg checkpoint needs its dumped config: {found} beside it and no config "
                     f"in its meta; pass it with --source-config")


def _get(d: dict, key: str, file: Any, where: str) -> Any:
    if key not in d:
        raise ConfigError(file, f"{where}.{key}", "missing")
    return d[key]


def _eps(norm_cfg: dict | None) -> float:
    # MMSeg's build_norm_layer(dict(type='LN')) is nn.LayerNorm's default eps 1e-5
    return float((norm_cfg or {}).get("eps", 1e-5))


def _pipeline_steps(cfg: dict) -> list[dict]:
    steps = []

    def walk(x):
        if isinstance(x, dict):
            steps.append(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(cfg.get("test_pipeline", []))
    return steps


def _ms_rules(cfg: dict) -> dict:
    """Scales and their base from the config's TTA: 1.x ``tta_pipeline`` Resize(scale_factor=r)
    scales the original image; 0.x ``MultiScaleFlipAug(img_ratios)`` scales (2048, 512)."""
    tta = cfg.get("tta_pipeline")
    if isinstance(tta, list):
        factors = []

        def walk(x):
            if isinstance(x, dict):
                if x.get("type") == "Resize" and "scale_factor" in x:
                    factors.append(float(x["scale_factor"]))
                for v in x.values():
                    walk(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v)

        walk(tta)
        if factors:
            return {"scales": factors, "ratio_base": "original"}
    for step in _pipeline_steps(cfg):
        if step.get("type") == "MultiScaleFlipAug" and step.get("img_ratios"):
            return {"scales": [float(r) for r in step["img_ratios"]], "ratio_base": "test_scale"}
    return {}


def _test_scale(cfg: dict, default: int) -> int:
    for step in _pipeline_steps(cfg):
        scale = step.get("scale") or step.get("img_scale")
        if step.get("type") in ("Resize", "MultiScaleFlipAug") and isinstance(scale, (list, tuple)) and len(scale) == 2:
            return int(min(scale))
    return default


def config_fields(cfg: dict, file: Any) -> dict:
    """Model, data and eval fields of a segrepro Config from an MMSeg config."""
    model = _get(cfg, "model", file, "")
    bb = _get(model, "backbone", file, "model")
    head = _get(model, "decode_head", file, "model")
    if bb.get("type") != "VisionTransformer":
        raise ConfigError(file, "model.backbone.type", f"expected VisionTransformer, got {bb.get('type')!r}")
    if not bb.get("final_norm", False) or not bb.get("with_cls_token", True):
        raise ConfigError(file, "model.backbone", "expected final_norm=True and with_cls_token=True "
                                                        "(the Segmenter configs)")
    d = int(_get(bb, "embed_dims", file, "model.backbone"))
    mlp_ratio = float(bb.get("mlp_ratio", 4))
    interp = bb.get("interpolate_mode", "bicubic")
    if interp not in ("bilinear", "bicubic"):
        raise ConfigError(file, "model.backbone.interpolate_mode", f"expected bilinear or bicubic, got {interp!r}")
    m = {
        "patch_size": int(bb.get("patch_size", 16)), "d_model": d,
        "n_layers": int(_get(bb, "num_layers", file, "model.backbone")),
        "n_heads": int(_get(bb, "num_heads", file, "model.backbone")), "mlp_ratio": mlp_ratio,
        "image_size": square_size(_get(bb, "img_size", file, "model.backbone"), file, "model.backbone.img_size"),
        "n_cls": int(_get(head, "num_classes", file, "model.decode_head")),
        "drop_path_rate": float(bb.get("drop_path_rate", 0.0)), "dropout": float(bb.get("drop_rate", 0.0)),
        # encoder norm_cfg covers blocks and the final ln1 (1e-6 in the Segmenter configs)
        "ln_eps": _eps(bb.get("norm_cfg")), "final_norm_eps": _eps(bb.get("norm_cfg")),
        "pos_embed_interp": interp, "pos_embed_resize": "token_count", "logits_resize": "direct",
    }
    kind = head.get("type")
    if kind == "SegmenterMaskTransformerHead":
        if int(head.get("embed_dims", d)) != d or int(head.get("in_channels", d)) != d \
                or float(head.get("mlp_ratio", 4)) != mlp_ratio:
            raise ConfigError(file, "model.decode_head", "expected embed_dims and in_channels equal to the "
                                                               "backbone's embed_dims and the backbone's mlp_ratio")
        eps = _eps(head.get("norm_cfg"))  # the head's norm_cfg defaults to LN, eps 1e-5
        m["decoder"] = {"name": "mask_transformer", "n_layers": int(_get(head, "num_layers", file, "model.decode_head")),
                        "n_heads": int(_get(head, "num_heads", file, "model.decode_head")),
                        "dropout": float(head.get("dropout_ratio", 0.0)),
                        "drop_path_rate": float(head.get("drop_path_rate", 0.1)), "ln_eps": eps, "norm_eps": eps}
    elif kind == "FCNHead":
        if head.get("num_convs", 2) != 0 or head.get("concat_input", True):
            raise ConfigError(file, "model.decode_head", "an FCNHead is read as Segmenter's linear decoder "
                                                               "only with num_convs=0 and concat_input=False")
        m["decoder"] = {"name": "linear"}
    else:
        raise ConfigError(file, "model.decode_head.type",
                                f"expected SegmenterMaskTransformerHead or FCNHead, got {kind!r}")
    pre = model.get("data_preprocessor") or cfg.get("data_preprocessor") or cfg.get("img_norm_cfg") or {}
    m["normalization"] = normalization_named(pre.get("mean"), pre.get("std"), file, "model.data_preprocessor")
    test = model.get("test_cfg") or {}
    if test.get("mode") != "slide":
        raise ConfigError(file, "model.test_cfg.mode", f"expected 'slide' (the Segmenter configs), got {test.get('mode')!r}")
    window = square_size(_get(test, "crop_size", file, "model.test_cfg"), file, "model.test_cfg.crop_size")
    stride = square_size(_get(test, "stride", file, "model.test_cfg"), file, "model.test_cfg.stride")
    ev = {"protocol": "mmseg", "window": window, "stride": stride, "small_views": "low_res", **_ms_rules(cfg)}
    train_cfg = cfg.get("train_cfg") or {}
    optim = {"iterations": int(train_cfg.get("max_iters", 160000))}
    data = {"crop_size": m["image_size"], "test_scale": _test_scale(cfg, m["image_size"])}
    return {"model": m, "data": data, "eval": ev, "optim": optim}


def convert_state(state: dict, patch_bias: bool) -> dict:
    """MMSeg names and layouts -> the reference's (README table); unknown keys keep their name so
    the loader reports them as unexpected."""
    out = {}
    for key, value in state.items():
        new = None
        m = _LAYER.match(key)
        if m:
            side, i, rest = m.groups()
            for src, dst in _BLOCK.items():
                if rest == src or rest.startswith(src + "."):
                    prefix = "encoder" if side == "backbone" else "decoder"
                    new = f"{prefix}.blocks.{i}.{dst}{rest[len(src):]}"
        elif key in ("decode_head.patch_proj.weight", "decode_head.classes_proj.weight"):
            # torch Linear(bias=False) computes x @ W.T; the reference's raw matrix is used as x @ P
            new, value = ("decoder.proj_patch" if "patch" in key else "decoder.proj_classes"), value.t()
        else:
            for src, dst in _TOP.items():
                if key == src or key.startswith(src + "."):
                    new = dst + key[len(src):]
            if new == "decoder.head.weight" and value.ndim == 4:
                value = value[:, :, 0, 0]  # the 1x1 conv_seg is one Linear per patch token
        out[new or key] = value
    weight = out.get("encoder.patch_embed.proj.weight")
    if "encoder.patch_embed.proj.bias" not in out and not patch_bias and weight is not None:
        # MMSeg >= 1.2 builds the patch embedding without a bias (patch_bias=False): a zero bias.
        # 0.x zoo checkpoints carry one, which is then used, as their training used it.
        out["encoder.patch_embed.proj.bias"] = weight.new_zeros(weight.shape[0])
    return out


def read(path: Path, ckpt: dict, source_config: Path | None) -> tuple[dict, dict, str]:
    """(segrepro-named state dict, Config fields, where the config came from)."""
    cfg, where = find_config(path, ckpt, source_config)
    fields = config_fields(cfg, where)
    patch_bias = bool(cfg["model"]["backbone"].get("patch_bias", False))
    return convert_state(ckpt["state_dict"], patch_bias), fields, where
