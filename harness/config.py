"""One validated config schema for every zoo row, recipe and run profile.

A configuration is a zoo YAML (experiments/zoo/NAME.yaml, the reference recipe written out in
full) with a named recipe (experiments/recipes/) and a run profile (experiments/profiles/)
merged over it. Every problem is reported as one ``ConfigError`` naming the file, the field
and what was expected. This module imports nothing of the project.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

# Normalisation statistics on the 0..255 scale: facts of the reference code (segm/data/utils.py
# STATS: "vit" 0.5/0.5, "deit" the ImageNet statistics) scaled by 255.
NORMALIZATION = {
    "vit": {"mean": (127.5, 127.5, 127.5), "std": (127.5, 127.5, 127.5)},
    "deit": {"mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375)},
}


class InputError(ValueError):
    """Bad input (a file, a field, a value): one message naming it; the CLI exits with 2."""


class ConfigError(InputError):
    """A configuration problem: which file, which field, what was expected."""

    def __init__(self, file: str | os.PathLike | None, field: str | None, message: str):
        self.file = str(file) if file is not None else None
        self.field = field
        where = self.file or "<config>"
        if field:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


def experiments_dir() -> Path:
    """The experiments/ data directory (``SEGREPRO_EXPERIMENTS`` overrides the checkout's)."""
    env = os.environ.get("SEGREPRO_EXPERIMENTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "experiments"


@dataclass(frozen=True)
class DecoderConfig:
    name: Literal["mask_transformer", "linear"]
    n_layers: int = 2
    dropout: float = 0.1
    drop_path_rate: float = 0.0
    # heads of the mask decoder; null = d_model / 64, the reference's rule
    n_heads: Optional[int] = None
    # LayerNorm eps of the decoder blocks, and of decoder_norm and mask_norm; null = the
    # encoder's ln_eps (the reference: 1e-5 everywhere; MMSeg's head: 1e-5 with a 1e-6
    # encoder; PaddleViT: blocks 1e-6, decoder_norm and mask_norm 1e-5)
    ln_eps: Optional[float] = None
    norm_eps: Optional[float] = None


@dataclass(frozen=True)
class ModelConfig:
    backbone: str  # timm architecture name of the ImageNet encoder
    patch_size: int
    d_model: int
    n_layers: int
    n_heads: int
    decoder: DecoderConfig
    mlp_ratio: float = 4.0
    distilled: bool = False
    image_size: int = 512  # the position grid is stored at image_size / patch_size
    n_cls: int = 150
    drop_path_rate: float = 0.1
    dropout: float = 0.0
    ln_eps: float = 1e-5  # encoder blocks (the default of every other LayerNorm)
    final_norm_eps: Optional[float] = None  # the encoder's final norm; null = ln_eps
    normalization: Literal["vit", "deit"] = "vit"  # training normalisation
    # position grid resized to the input's grid: bilinear (reference) or bicubic (MMSeg), when
    # the token count differs from the stored grid's (both), or never (PaddleViT: the input
    # must be the training crop)
    pos_embed_interp: Literal["bilinear", "bicubic"] = "bilinear"
    pos_embed_resize: Literal["token_count", "never"] = "token_count"
    # patch-grid logits to pixels: upsampled to the padded size then cropped (reference,
    # PaddleViT) or resized straight to the unpadded input size (MMSeg)
    logits_resize: Literal["pad_crop", "direct"] = "pad_crop"
    attention: Literal["torch", "triton"] = "torch"
    mask_step: Literal["torch", "triton"] = "torch"
    # timm pretrained tag ("ARCH.TAG") of the ImageNet checkpoint the source started from;
    # null where the source never published it (a local file is then required)
    pretrained: Optional[str] = None
    # what the encoder starts from: "pretrained" (the file must be found), "scratch" (random
    # init), "auto" (pretrained when found, else scratch: the smoke profile); a run resolves
    # "auto" and records the SHA-256 of the file it loaded (harness/weights.py)
    init: Literal["pretrained", "scratch", "auto"] = "pretrained"
    init_sha256: Optional[str] = None


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["ade20k"] = "ade20k"
    augmentation: Literal["reference", "paddlevit"] = "reference"
    crop_size: int = 512
    train_scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    test_scale: int = 512  # short side at test time (long side capped at 4x)
    num_workers: int = 4


@dataclass(frozen=True)
class OptimConfig:
    iterations: int
    batch_size: int  # global, split across workers
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    poly_power: float = 0.9
    min_lr: float = 1e-5
    warmup_iterations: int = 0  # reference iter_warmup (0 in every released run)
    poly_step_size: int = 1  # reference poly_step_size: the rate changes every N iterations
    decoder_lr_mult: float = 1.0
    clip_grad: Optional[float] = None
    loss_average: Literal["labelled", "all"] = "labelled"
    # training precision; the three sources all train in fp32, mixed precision is opt-in (CUDA only)
    amp: Literal["fp32", "fp16", "bf16"] = "fp32"
    eval_interval: int = 8000
    checkpoint_interval: int = 2000
    log_interval: int = 50
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol: every field is logged with each result (``harness.evaluate.Protocol``)."""

    protocol: str = "reference"  # the protocol's name: the recipe (source) whose rules these are
    window: int = 512
    stride: int = 480
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = True
    # reference: views smaller than the window are upsampled to it; mmseg: run at low resolution
    small_views: Literal["upsample", "low_res"] = "upsample"
    # stride of the evaluation during training: "window" (the reference's config.yml and
    # PaddleViT evaluate with stride = window) or "test" (MMSeg validates with its test stride)
    train_stride: Literal["window", "test"] = "window"
    # test resize to data.test_scale: "fit" = mmcv imrescale into (4 s, s), rounded, on the uint8
    # image (reference, MMSeg); "short_side" = short side s, long side truncated, no cap, on the
    # float image (PaddleViT's Resize)
    resize: Literal["fit", "short_side"] = "fit"
    # multi-scale ratio r scales test_scale (reference, MMSeg 0.x: fit (2048 r, 512 r)) or the
    # original image (MMSeg 1.x tta_pipeline: Resize(scale_factor=r))
    ratio_base: Literal["test_scale", "original"] = "test_scale"
    # where predictions are scored: the original label (reference, MMSeg) or the label resized
    # (nearest) to the single-scale view (PaddleViT)
    label_resolution: Literal["original", "resized"] = "original"
    # null = the training normalisation (model.normalization); "backbone" = the encoder family's
    # statistics, ViT 127.5/127.5 and DeiT ImageNet (PaddleViT's VAL.MEAN/STD per yaml)
    normalization: Optional[Literal["vit", "deit", "backbone"]] = None
    # mIoU bookkeeping (harness.metrics.BOOKKEEPING): "mmseg" leaves classes with union 0 out of
    # the mean (reference, MMSeg); "paddlevit" counts them as IoU 0
    bookkeeping: Literal["mmseg", "paddlevit"] = "mmseg"
    batch_size: int = 4


@dataclass(frozen=True)
class BenchConfig:
    """Throughput protocol of ``reproduce``'s benchmark stage (timm / MMSeg style)."""

    batch_size: int = 1
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    warmup: int = 5
    repeats: int = 30


@dataclass(frozen=True)
class Config:
    name: str
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    eval: EvalConfig
    bench: BenchConfig = BenchConfig()
    description: str = ""
    recipe: str = "reference"
    profile: str = "full"
    # who produced the weights: segrepro's training, or a source's checkpoint read by
    # harness.models.load_checkpoint (reference run directory, MMSeg .pth, PaddleViT .pdparams)
    source: Literal["segrepro", "reference", "mmseg", "paddlevit"] = "segrepro"

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @property
    def mean(self) -> tuple[float, float, float]:
        return NORMALIZATION[self.model.normalization]["mean"]

    @property
    def std(self) -> tuple[float, float, float]:
        return NORMALIZATION[self.model.normalization]["std"]


def square_size(value: Any, file: Any, field: str) -> int:
    """An int or a (h, w) pair of a source's config as one side; a ConfigError if not square."""
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    if h != w:
        raise ConfigError(file, field, f"expected a square size, got {value!r}")
    return int(h)


def normalization_named(mean: Any, std: Any, file: Any, field: str) -> str:
    """The NORMALIZATION name of a source's mean/std (0..255 scale); a ConfigError for others."""
    for name, stats in NORMALIZATION.items():
        if (mean is not None and std is not None and len(mean) == 3 and len(std) == 3
                and all(abs(a - b) < 1e-3 for a, b in zip(list(mean) + list(std), stats["mean"] + stats["std"]))):
            return name
    raise ConfigError(file, field, f"mean {mean} / std {std}: expected the statistics of one of "
                                   f"{', '.join(NORMALIZATION)} ({NORMALIZATION})")


def normalization_name(rule: str | None, model: ModelConfig) -> str:
    """EvalConfig.normalization resolved for a checkpoint's model: null = its training
    normalisation, "backbone" = its encoder family's statistics (ViT 127.5, DeiT ImageNet)."""
    if rule is None:
        return model.normalization
    if rule == "backbone":
        return "deit" if model.backbone.startswith("deit") else "vit"
    return rule


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, file: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the schema's type."""
    origin = typing.get_origin(tp)
    bad = ConfigError(file, path, f"expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, file, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(value, inner, file, path)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], file, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_convert(v, a, file, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"schema type {tp} is not handled")


def _build(cls: type, data: dict, file: Any, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(file, f"{prefix}{'.' if prefix else ''}{key}",
                              f"unknown field; expected one of {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}{'.' if prefix else ''}{name}"
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], file, path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(file, path, f"missing; expected {_type_name(hints[name])}")
    return cls(**kwargs)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's float syntax: ``1e-3`` and ``1E5`` are numbers, not
    the strings YAML 1.1 (which wants ``1.0e-3``) makes of them."""


# YAML 1.2 core schema floats (https://yaml.org/spec/1.2.2/#10214-floating-point); the integers
# keep PyYAML's resolver, which comes first for digits only.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping, turning every failure into a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(path, None, f"malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, None, f"expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_override_fields(overrides: dict, cls: type, file: Any, prefix: str = "") -> None:
    """Recipe and profile files are partial configs: check their field names up front."""
    hints = typing.get_type_hints(cls)
    for key, value in overrides.items():
        path = f"{prefix}{'.' if prefix else ''}{key}"
        if key not in hints:
            raise ConfigError(file, path, f"unknown field; expected one of {', '.join(hints)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _check_override_fields(value, hints[key], file, path)


def _named(kind: str, name: str) -> Path:
    """experiments/KIND/NAME.yaml, or a ConfigError listing the names that exist."""
    path = experiments_dir() / kind / f"{name}.yaml"
    if not path.is_file():
        what = {"zoo": "configuration", "recipes": "recipe", "profiles": "profile"}[kind]
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(None, what, f"unknown {what} {name!r}; expected one of {', '.join(known)}")
    return path


def recipe_overrides(name: str) -> dict:
    """The overrides of experiments/recipes/NAME.yaml, checked against the schema."""
    return _overrides("recipes", name)[1]


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (experiments_dir() / "recipes").glob("*.yaml"))


def zoo_names() -> list[str]:
    return sorted(p.stem for p in (experiments_dir() / "zoo").glob("*.yaml"))


def _overrides(kind: str, name: str) -> tuple[Path, dict]:
    path = _named(kind, name)
    data = read_yaml(path)
    unknown = set(data) - {"description", "overrides"}
    if unknown:
        raise ConfigError(path, sorted(unknown)[0], "unknown field; expected description, overrides")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(path, "overrides", f"expected a mapping, got {overrides!r}")
    _check_override_fields(overrides, Config, path)
    return path, overrides


def config_from_dict(data: dict, file: Any = None) -> Config:
    cfg = _build(Config, data, file)
    _check_consistency(cfg, file)
    return cfg


def _check_consistency(cfg: Config, file: Any) -> None:
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ConfigError(file, "model.n_heads", f"must divide d_model {m.d_model}, got {m.n_heads}")
    if m.pretrained is not None and not m.pretrained.startswith(m.backbone + "."):
        raise ConfigError(file, "model.pretrained", f"expected a timm tag '{m.backbone}.TAG', got {m.pretrained!r}")
    if m.image_size % m.patch_size:
        raise ConfigError(file, "model.image_size", f"must be a multiple of patch_size {m.patch_size}")
    if cfg.eval.stride <= 0 or cfg.eval.stride > cfg.eval.window:
        raise ConfigError(file, "eval.stride", f"expected 1..window ({cfg.eval.window}), got {cfg.eval.stride}")
    if cfg.optim.batch_size <= 0 or cfg.optim.iterations <= 0:
        raise ConfigError(file, "optim", "batch_size and iterations must be positive")
    if cfg.optim.poly_step_size < 1:
        raise ConfigError(file, "optim.poly_step_size", f"expected at least 1, got {cfg.optim.poly_step_size}")
    if not 0 <= cfg.optim.warmup_iterations < cfg.optim.iterations:
        raise ConfigError(file, "optim.warmup_iterations",
                          f"expected 0..iterations-1 ({cfg.optim.iterations - 1}), got {cfg.optim.warmup_iterations}")


def load_config(name_or_path: str | os.PathLike, recipe: str | None = None,
                profile: str | None = None, overrides: dict | None = None) -> Config:
    """Resolve a zoo row (by name or YAML path) with a recipe and a run profile.

    Precedence, lowest first: the zoo YAML, the recipe, the profile, then ``overrides``.
    """
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = _named("zoo", str(name_or_path))
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    # Validate the zoo file alone first so an error names the file that holds it.
    _check_override_fields(data, Config, path)
    recipe = recipe or data.get("recipe", "reference")
    profile = profile or data.get("profile", "full")
    _, recipe_over = _overrides("recipes", recipe)
    _, profile_over = _overrides("profiles", profile)
    merged = deep_merge(deep_merge(data, recipe_over), profile_over)
    if overrides:
        _check_override_fields(overrides, Config, "<command line>")
        merged = deep_merge(merged, overrides)
    merged["recipe"], merged["profile"] = recipe, profile
    return config_from_dict(merged, path)


# The EvalConfig fields that are rules of a protocol; window, stride and test scale are sizes of
# the checkpoint (its training crop), and batch_size changes no figure.
PROTOCOL_RULES = ("scales", "flip", "small_views", "resize", "ratio_base", "label_resolution",
                  "normalization", "bookkeeping")


def apply_protocol(cfg: Config, name: str) -> Config:
    """``cfg`` evaluated under the named protocol: the rules of recipe ``name``'s ``eval`` section
    (EvalConfig's defaults are the reference's), the checkpoint's window, and the stride that
    keeps the protocol's window overlap (recipe window - stride: 32 for the reference and MMSeg,
    512/480 and 640/608; 0 for PaddleViT, stride = window). The checkpoint's own protocol keeps
    its own stride, as its files give it."""
    if name == cfg.eval.protocol:
        return cfg
    if name not in recipe_names():
        raise InputError(f"--protocol {name}: unknown protocol; expected one of {', '.join(recipe_names())}")
    path, over = _overrides("recipes", name)
    rules = _build(EvalConfig, over.get("eval", {}), path, "overrides.eval")
    data = cfg.to_dict()
    data["eval"].update({f: _plain(getattr(rules, f)) for f in PROTOCOL_RULES}, protocol=name,
                        stride=max(cfg.eval.window - (rules.window - rules.stride), 1))
    return config_from_dict(data, path)


def released_rows(path: str | os.PathLike | None = None) -> dict[str, ModelConfig]:
    """Architectures of the documented rows that have no zoo YAML (experiments/released.yaml):
    row name -> the model of zoo row ``like`` with ``model`` overrides."""
    path = Path(path) if path else experiments_dir() / "released.yaml"
    rows = read_yaml(path).get("rows")
    if not isinstance(rows, dict):
        raise ConfigError(path, "rows", "expected a mapping of row name -> {like, model}")
    out = {}
    for name, row in rows.items():
        if not isinstance(row, dict) or set(row) - {"like", "model"} or "like" not in row:
            raise ConfigError(path, f"rows.{name}", f"expected a mapping with 'like' (a zoo row) and 'model', got {row!r}")
        base = load_config(row["like"]).to_dict()
        out[name] = config_from_dict(deep_merge(base, {"model": row.get("model") or {}}), path).model
    return out


def load_documented(path: str | os.PathLike | None = None) -> list[dict]:
    """The documented figures of every source (experiments/documented.yaml), validated."""
    path = Path(path) if path else experiments_dir() / "documented.yaml"
    data = read_yaml(path)
    sources = data.get("sources")
    metrics = data.get("metrics")
    figures = data.get("figures")
    if not isinstance(sources, dict) or not isinstance(metrics, dict) or not isinstance(figures, list):
        raise ConfigError(path, None, "expected mappings 'sources', 'metrics' and a list 'figures'")
    rows = []
    for i, fig in enumerate(figures):
        where = f"figures[{i}]"
        if not isinstance(fig, dict):
            raise ConfigError(path, where, f"expected a mapping, got {fig!r}")
        for key in ("config", "source", "metric", "value"):
            if key not in fig:
                raise ConfigError(path, f"{where}.{key}", "missing")
        extra = set(fig) - {"config", "source", "metric", "value", "protocol"}
        if extra:
            raise ConfigError(path, f"{where}.{sorted(extra)[0]}", "unknown field; expected config, source, metric, value, protocol")
        if fig["source"] not in sources:
            raise ConfigError(path, f"{where}.source", f"expected one of {', '.join(sources)}, got {fig['source']!r}")
        if fig["metric"] not in metrics:
            raise ConfigError(path, f"{where}.metric", f"expected one of {', '.join(metrics)}, got {fig['metric']!r}")
        if isinstance(fig["value"], bool) or not isinstance(fig["value"], (int, float)):
            raise ConfigError(path, f"{where}.value", f"expected a number, got {fig['value']!r}")
        rows.append({
            "config": fig["config"], "source": fig["source"], "metric": fig["metric"],
            "value": float(fig["value"]), "unit": metrics[fig["metric"]].get("unit", ""),
            "protocol": fig.get("protocol") or sources[fig["source"]].get("protocol", ""),
        })
    return rows


def documented_sources(path: str | os.PathLike | None = None) -> dict:
    path = Path(path) if path else experiments_dir() / "documented.yaml"
    return read_yaml(path)["sources"]
