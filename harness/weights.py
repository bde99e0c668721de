"""ImageNet backbone weights: where each zoo row's checkpoint is, which file it is, how to get it.

Every zoo row names the checkpoint its source started from as a timm pretrained tag
(``model.pretrained``, e.g. ``vit_tiny_patch16_384.augreg_in21k_ft_in1k``: timm 0.4.12's
default for the backbone, which the reference loads; timm 1.x serves the same files from the
Hugging Face hub under these tags). A file is found, in this order:

1. an explicit file (``--backbone-weights FILE``);
2. the standard Hugging Face cache, where ``segrepro weights fetch`` (timm's own hub loading)
   puts it: ``$HF_HUB_CACHE/models--timm--<tag>/snapshots/<revision>/model.safetensors``
   (``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` are honoured by huggingface_hub);
3. ``--backbone-dir DIR``: a file named by the tag or by the timm model name
   (``<tag>.safetensors``, ``<backbone>.pth``, ...), the offline route and the only one for
   checkpoints that were never published (Seg-B/8's ``vit_base_patch8_384``).

The identity of what a run starts from (``model.init`` and the file's SHA-256,
``model.init_sha256``) is written into its resolved config, so it is logged, hashed into the
run's identity and checked on resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from harness.config import Config, InputError

# timm's hub loading tries the safetensors file first, then the pickle
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
DIR_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


@dataclass(frozen=True)
class BackboneFile:
    path: Path
    sha256: str
    origin: str  # "file", "hub cache" or "backbone dir"


_digests: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) within the process: the driver,
    the training driver and rank 0 check the same multi-GB file in turn."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _digests[key] = h.hexdigest()
    return _digests[key]


def hub_repo_id(tag: str) -> str:
    """The Hugging Face repository timm serves ``tag`` from (``timm/<tag>``)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(tag)
    if cfg is None or not cfg.hf_hub_id:
        raise InputError(f"pretrained tag {tag!r}: timm does not serve it from the Hugging Face hub")
    return cfg.hf_hub_id.split("@")[0]


def find_in_hub_cache(tag: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached file timm would load for ``tag``, or None (no network access)."""
    from huggingface_hub import try_to_load_from_cache

    repo = hub_repo_id(tag)
    for name in HUB_FILENAMES:
        found = try_to_load_from_cache(repo, name, cache_dir=str(cache_dir) if cache_dir else None)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def find_in_dir(directory: str | os.PathLike, names: list[str]) -> Path | None:
    """``DIR/<name><suffix>`` for the first name (tag, then model name) that has a file."""
    for name in names:
        for suffix in DIR_SUFFIXES:
            path = Path(directory) / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def locate(cfg: Config, backbone_dir: str | os.PathLike | None = None, file: str | os.PathLike | None = None,
           cache_dir: str | os.PathLike | None = None) -> BackboneFile | None:
    """The backbone file of ``cfg`` (explicit file, hub cache, backbone dir), hashed; None if absent."""
    m = cfg.model
    if backbone_dir is not None and not Path(backbone_dir).is_dir():
        raise InputError(f"--backbone-dir {backbone_dir}: no such directory")
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise InputError(f"--backbone-weights {file}: no such file")
        return BackboneFile(path.resolve(), sha256_file(path), "file")
    if m.pretrained:
        path = find_in_hub_cache(m.pretrained, cache_dir)
        if path is not None:
            return BackboneFile(path, sha256_file(path), "hub cache")
    if backbone_dir is not None:
        names = ([m.pretrained] if m.pretrained else []) + [m.backbone]
        path = find_in_dir(backbone_dir, names)
        if path is not None:
            return BackboneFile(path.resolve(), sha256_file(path), "backbone dir")
    return None


def missing_message(cfg: Config, backbone_dir: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None) -> str:
    m = cfg.model
    where = f"the Hugging Face cache ({hub_cache_dir(cache_dir)})"
    if backbone_dir is not None:
        where += f" nor in --backbone-dir {backbone_dir}"
    if m.pretrained:
        return (f"{cfg.name}: ImageNet backbone {m.pretrained} is not in {where}; fetch it with "
                f"`segrepro weights fetch --configs {cfg.name}`, or pass --backbone-dir DIR holding "
                f"{m.pretrained}.safetensors (or {m.backbone}.pth); --from-scratch trains from random init instead")
    return (f"{cfg.name}: ImageNet backbone {m.backbone} was never published, so it cannot be fetched; pass "
            f"--backbone-dir DIR holding {m.backbone}.pth (the reference's local file), or --from-scratch")


def resolve(cfg: Config, backbone_dir: str | os.PathLike | None = None, file: str | os.PathLike | None = None,
            from_scratch: bool = False, cache_dir: str | os.PathLike | None = None) -> tuple[Config, BackboneFile | None]:
    """``cfg`` with its initialisation resolved (``model.init`` 'pretrained' with the file's
    SHA-256, or 'scratch') and the file to load.

    ``init: pretrained`` (the full profile) without a file is an InputError naming the tag and
    the command that fetches it; ``init: auto`` (the smoke profile) falls back to random init.
    A config that already pins ``init_sha256`` must find exactly that file.
    """
    m = cfg.model
    if from_scratch or m.init == "scratch":
        return _with_init(cfg, "scratch", None), None
    found = locate(cfg, backbone_dir, file, cache_dir)
    if found is None:
        if m.init == "auto":
            return _with_init(cfg, "scratch", None), None
        raise InputError(missing_message(cfg, backbone_dir, cache_dir))
    if m.init_sha256 and m.init_sha256 != found.sha256:
        raise InputError(f"{found.path}: SHA-256 {found.sha256} differs from the {m.init_sha256} this run "
                         f"was started with ({cfg.name}); use the same weights or a new run directory")
    return _with_init(cfg, "pretrained", found.sha256), found


@dataclass(frozen=True)
class Resolved:
    cfg: Config
    file: BackboneFile | None
    note: str  # what the encoder starts from, for people (describe)


def resolve_all(cfgs: list[Config], backbone_dir: str | os.PathLike | None = None, from_scratch: bool = False,
                cache_dir: str | os.PathLike | None = None) -> list[Resolved]:
    """``resolve`` for every configuration; one InputError lists every one that is missing."""
    out, missing = [], []
    for cfg in cfgs:
        try:
            resolved, found = resolve(cfg, backbone_dir, from_scratch=from_scratch, cache_dir=cache_dir)
        except InputError as e:
            missing.append(str(e))
            continue
        out.append(Resolved(resolved, found, describe(resolved, found, cfg.model.init)))
    if missing:
        raise InputError("\n".join(dict.fromkeys(missing)))  # a bad --backbone-dir once, not per row
    return out


def _with_init(cfg: Config, init: str, sha256: str | None) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=init, init_sha256=sha256))


def describe(cfg: Config, found: BackboneFile | None = None, requested: str | None = None) -> str:
    """What a resolved config's encoder starts from; with ``found``, also where the file is;
    with the ``requested`` init ('auto'), why it fell back to random init."""
    m = cfg.model
    if m.init == "scratch":
        if requested == "auto":
            return (f"random init: {m.pretrained or m.backbone} is not cached and the {cfg.profile} profile may "
                    f"train from scratch (`segrepro weights fetch --configs {cfg.name}` gets it)")
        return "random init (from scratch)"
    text = f"{m.pretrained or m.backbone} (sha256 {m.init_sha256[:12]})" if m.init_sha256 else str(m.pretrained)
    return f"{text}, {found.origin} {found.path}" if found else text


def fetch(tag: str) -> None:
    """Download ``tag`` into the Hugging Face cache through timm's own hub loading (with
    huggingface_hub's progress bar); a no-op when it is cached."""
    import timm

    try:
        timm.create_model(tag, pretrained=True)
    except Exception as e:  # network, offline mode, hub errors: one line naming the tag
        raise FetchError(f"{tag}: download failed ({type(e).__name__}: {e})") from None


class FetchError(RuntimeError):
    """A download that failed (network or hub): exit 1, not bad input."""
