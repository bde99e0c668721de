"""ImageNet backbone weights through the real timm + huggingface_hub code path, offline: a
generated checkpoint in timm's layout inside a Hugging Face cache in the hub's own on-disk
layout (blobs named by SHA-256, snapshot symlinks, refs/main)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from harness import weights
from harness.config import InputError, load_config
from harness.data.synth import synthesize
from harness.models import build_model, load_backbone_weights
from harness.identity import training_id
from harness.train.checkpoint import check_resumable

TINY_TAG = "vit_tiny_patch16_384.augreg_in21k_ft_in1k"
DEIT_TAG = "deit_tiny_distilled_patch16_224.fb_in1k"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def write_hub_checkpoint(cache: Path, tag: str, seed: int = 0) -> Path:
    """A randomly initialised timm model of ``tag``'s architecture, saved as the hub stores it."""
    torch.manual_seed(seed)
    state = timm.create_model(tag.split(".")[0], pretrained=False).state_dict()
    repo = cache / f"models--timm--{tag}"
    tmp = repo / "tmp.safetensors"
    repo.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    (repo / "blobs").mkdir()
    blob = repo / "blobs" / digest
    tmp.rename(blob)
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snap / "model.safetensors"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    write_hub_checkpoint(cache, TINY_TAG)
    write_hub_checkpoint(cache, DEIT_TAG, seed=1)
    return cache


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ade")
    synthesize(root, train=4, val=2, size=(64, 64), classes=4, seed=0)
    return root


def cli(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True, env=full,
                          timeout=300)


def test_weights_check_finds_the_cached_file_and_prints_its_sha256(hub_cache):
    res = cli("weights", "check", "--configs", "seg_tiny_mask", cache=hub_cache)
    assert res.returncode == 0, res.stderr
    blob = next((hub_cache / f"models--timm--{TINY_TAG}" / "blobs").iterdir())
    assert TINY_TAG in res.stdout and f"sha256 {hashlib.sha256(blob.read_bytes()).hexdigest()}" in res.stdout


def test_weights_check_exits_1_naming_the_fetch_command(tmp_path):
    res = cli("weights", "check", "--configs", "seg_small_mask,seg_base_patch8", cache=tmp_path)
    assert res.returncode == 1
    assert "segrepro weights fetch --configs seg_small_mask" in res.stdout
    assert "vit_base_patch8_384 (never published)" in res.stdout and "--backbone-dir" in res.stdout


def test_weights_fetch_goes_through_timm_hub_loading(hub_cache, tmp_path):
    res = cli("weights", "fetch", "--configs", "seg_tiny_mask", cache=hub_cache)
    assert res.returncode == 0, res.stderr
    assert "sha256" in res.stdout
    offline_empty = cli("weights", "fetch", "--configs", "seg_tiny_mask", cache=tmp_path)
    assert offline_empty.returncode == 1
    assert f"{TINY_TAG}: download failed" in offline_empty.stderr and "Traceback" not in offline_empty.stderr


def test_encoder_holds_exactly_the_files_weights(hub_cache):
    cfg = load_config("seg_tiny_mask", overrides={"model": {"n_layers": 12}})
    resolved, found = weights.resolve(cfg, cache_dir=hub_cache)
    assert found.origin == "hub cache" and resolved.model.init == "pretrained"
    assert resolved.model.init_sha256 == hashlib.sha256(found.path.read_bytes()).hexdigest()
    model = build_model(resolved.model)
    load_backbone_weights(model, found.path, resolved.model.backbone)
    src = timm.models.load_state_dict(str(found.path))
    enc = model.encoder.state_dict()
    assert set(src) == set(enc)
    for k, v in src.items():
        if k != "pos_embed":
            assert torch.equal(enc[k], v), k
    # the 24x24 grid of the 384 checkpoint resized to 32x32 as timm resamples it, cls token kept
    want = resample_abs_pos_embed(src["pos_embed"], [32, 32], [24, 24], 1, interpolation="bilinear",
                                  antialias=False)
    assert torch.equal(enc["pos_embed"], want)
    assert torch.equal(enc["pos_embed"][:, :1], src["pos_embed"][:, :1])


def test_deit_grid_resize_keeps_cls_and_dist_tokens(hub_cache):
    cfg = load_config("seg_base_deit_mask", overrides={"model": {
        "backbone": "deit_tiny_distilled_patch16_224", "pretrained": DEIT_TAG, "d_model": 192, "n_heads": 3}})
    resolved, found = weights.resolve(cfg, cache_dir=hub_cache)
    model = build_model(resolved.model)
    load_backbone_weights(model, found.path, resolved.model.backbone)
    src = timm.models.load_state_dict(str(found.path))["pos_embed"]
    got = model.encoder.pos_embed.detach()
    assert got.shape == (1, 2 + 32 * 32, 192)
    assert torch.equal(got[:, :2], src[:, :2])
    # (tests/models/test_checkpoint.py checks the same grid against the reference's own formula)
    assert torch.equal(got, resample_abs_pos_embed(src, [32, 32], [14, 14], 2, interpolation="bilinear",
                                                   antialias=False))


def test_backbone_dir_by_tag_or_model_name(tmp_path):
    cfg = load_config("seg_base_patch8")
    with pytest.raises(InputError, match="never published"):
        weights.resolve(cfg, backbone_dir=tmp_path, cache_dir=tmp_path)
    torch.save({"x": torch.ones(1)}, tmp_path / "vit_base_patch8_384.pth")
    resolved, found = weights.resolve(cfg, backbone_dir=tmp_path, cache_dir=tmp_path)
    assert found.origin == "backbone dir" and found.path.name == "vit_base_patch8_384.pth"
    tiny = load_config("seg_tiny_mask")
    torch.save({"x": torch.zeros(1)}, tmp_path / f"{TINY_TAG}.pth")
    assert weights.resolve(tiny, backbone_dir=tmp_path, cache_dir=tmp_path)[1].path.name == f"{TINY_TAG}.pth"


def test_init_modes_and_pinned_digest(tmp_path, hub_cache):
    full = load_config("seg_tiny_mask")
    with pytest.raises(InputError, match=f"{TINY_TAG}.*segrepro weights fetch --configs seg_tiny_mask"):
        weights.resolve(full, cache_dir=tmp_path)
    scratch, found = weights.resolve(full, from_scratch=True, cache_dir=hub_cache)
    assert (scratch.model.init, scratch.model.init_sha256, found) == ("scratch", None, None)
    smoke = load_config("seg_tiny_mask", profile="smoke")
    fallback, _ = weights.resolve(smoke, cache_dir=tmp_path)
    assert fallback.model.init == "scratch"
    assert "may train from scratch" in weights.describe(fallback, requested=smoke.model.init)
    assert weights.resolve(smoke, cache_dir=hub_cache)[0].model.init == "pretrained"
    pinned = load_config("seg_tiny_mask", overrides={"model": {"init_sha256": "0" * 64}})
    with pytest.raises(InputError, match="differs from the 0000"):
        weights.resolve(pinned, cache_dir=hub_cache)
    # the identity is part of the run's identity: a resumed run may not change it
    resolved, _ = weights.resolve(full, cache_dir=hub_cache)
    assert training_id(resolved, "one split") != training_id(scratch, "one split")
    with pytest.raises(InputError, match="model.init .scratch. -> .pretrained.; model.init_sha256 None -> "):
        check_resumable(scratch.to_dict(), resolved, tmp_path)


def test_train_without_weights_stops_before_any_work(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    res = cli("train", "seg_tiny_mask", "--profile", "full", "--data-root", str(small_dataset),
              "--run-dir", str(run_dir), cache=tmp_path / "empty")
    assert res.returncode == 2
    assert TINY_TAG in res.stderr and "segrepro weights fetch" in res.stderr
    assert res.stderr.count("\n") <= 2 and "Traceback" not in res.stderr
    assert not run_dir.exists() and time.monotonic() - start < 60


def test_reproduce_without_weights_lists_every_missing_one(small_dataset, tmp_path):
    res = cli("reproduce", "--configs", "seg_tiny_mask,seg_base_patch8", "--profile", "full", "--data-root",
              str(small_dataset), "--run-dir", str(tmp_path / "run"), cache=tmp_path / "empty")
    assert res.returncode == 2, res.stderr
    assert TINY_TAG in res.stderr and "vit_base_patch8_384 was never published" in res.stderr
    assert not (tmp_path / "run").exists()


def test_train_loop_loads_only_the_resolved_file(small_dataset, hub_cache, tmp_path):
    from harness.train.loop import train_loop
    from harness.train.session import LocalSession

    cfg = load_config("seg_tiny_mask", overrides={"optim": {"batch_size": 2}})
    with pytest.raises(InputError, match=TINY_TAG):
        train_loop(cfg, small_dataset, LocalSession(tmp_path))
    resolved, found = weights.resolve(cfg, cache_dir=hub_cache)
    other = load_config("seg_tiny_mask", overrides={"optim": {"batch_size": 2}, "model": {"init_sha256": "f" * 64}})
    with pytest.raises(InputError, match=f"{found.path} on .*: SHA-256 {resolved.model.init_sha256} is not the ffff"):
        train_loop(other, small_dataset, LocalSession(tmp_path), backbone_weights=found.path)
