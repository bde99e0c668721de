"""Checkpoint loading: reference directories, segrepro files, timm backbones, and bad input."""
import shutil

import pytest
import timm
import torch
import torch.nn.functional as F

from harness.config import ConfigError, load_config
from harness.models import (CheckpointError, build_model, count_parameters, load_backbone_weights,
                            load_checkpoint, save_model_checkpoint)
from harness.models.checkpoint import read_variant


def test_reference_dir_file_and_segrepro_checkpoint_agree(parity_dir, tmp_path):
    model, cfg = load_checkpoint(parity_dir)
    assert not model.training
    same, _ = load_checkpoint(parity_dir / "checkpoint.pth")
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(ref, same(x))
        save_model_checkpoint(tmp_path / "own.pt", model, cfg, iteration=7)
        own, own_cfg = load_checkpoint(tmp_path / "own.pt")
        assert own_cfg == cfg
        assert torch.equal(ref, own(x))
    assert not (tmp_path / "own.pt.tmp").exists()


def test_variant_tuple_is_read_without_unsafe_yaml(tmp_path):
    text = "net_kwargs:\n  image_size: !!python/tuple\n  - 64\n  - 64\n"
    (tmp_path / "variant.yml").write_text(text)
    assert read_variant(tmp_path / "variant.yml")["net_kwargs"]["image_size"] == (64, 64)
    (tmp_path / "evil.yml").write_text("net_kwargs: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="evil.yml"):
        read_variant(tmp_path / "evil.yml")
    assert not (tmp_path / "pwned").exists()


def _copy_fixture(parity_dir, tmp_path):
    dst = tmp_path / parity_dir.name
    shutil.copytree(parity_dir, dst)
    return dst


def test_variant_training_settings_reach_the_config(tmp_path):
    from harness.models.checkpoint import config_from_variant

    variant = read_variant("tests/fixtures/vit_mask/variant.yml")
    assert variant["amp"] is False
    cfg = config_from_variant(variant, "vit_mask")
    assert cfg.optim.amp == "fp32" and cfg.optim.nesterov  # timm's "sgd" is Nesterov SGD
    assert cfg.eval.train_stride == "window"
    # every optimizer_kwargs value reaches the config, each set apart from its default
    variant["amp"] = True
    variant["world_batch_size"] = 16
    variant["algorithm_kwargs"].update(num_epochs=10, eval_freq=3)
    variant["optimizer_kwargs"].update(opt="momentum", lr=0.02, momentum=0.8, weight_decay=1e-4, min_lr=2e-6,
                                       poly_power=1.5, iter_max=1000, epochs=10, iter_warmup=50.0,
                                       poly_step_size=4, clip_grad=0.5)
    o = config_from_variant(variant, "vit_mask").optim
    assert (o.amp, o.batch_size, o.nesterov, o.lr, o.momentum, o.weight_decay, o.min_lr, o.poly_power,
            o.iterations, o.warmup_iterations, o.poly_step_size, o.clip_grad, o.eval_interval) == (
        "fp16", 16, False, 0.02, 0.8, 1e-4, 2e-6, 1.5, 1000, 50, 4, 0.5, 300)
    for key, value, field in (("opt", "adamw", "optimizer_kwargs.opt"), ("sched", "cosine", "optimizer_kwargs.sched")):
        bad = read_variant("tests/fixtures/vit_mask/variant.yml")
        bad["optimizer_kwargs"][key] = value
        with pytest.raises(ConfigError, match=field):
            config_from_variant(bad, "vit_mask", "variant.yml")
    bad["optimizer_kwargs"]["sched"] = "polynomial"
    bad["amp"] = "yes"
    with pytest.raises(ConfigError, match="field 'amp'"):
        config_from_variant(bad, "vit_mask", "variant.yml")


def test_missing_unexpected_and_mismatched_keys_are_listed(parity_dir, tmp_path):
    d = _copy_fixture(parity_dir, tmp_path)
    ckpt = torch.load(d / "checkpoint.pth", weights_only=True)
    state = ckpt["model"]
    del state["encoder.norm.weight"]
    state["decoder.surprise"] = torch.zeros(1)
    state["encoder.cls_token"] = torch.zeros(1, 1, 3)
    torch.save(ckpt, d / "checkpoint.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(d)
    msg = str(err.value)
    assert "missing keys (1): encoder.norm.weight" in msg
    assert "unexpected keys (1): decoder.surprise" in msg
    assert "encoder.cls_token: checkpoint (1, 1, 3) vs model (1, 1, 64)" in msg


def test_bad_checkpoint_paths(parity_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint.pth"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path)
    d = _copy_fixture(parity_dir, tmp_path / "x")
    (d / "variant.yml").unlink()
    with pytest.raises(CheckpointError, match="variant.yml"):
        load_checkpoint(d)


def test_parameter_count_matches_timm():
    # our encoder is timm's ViT with the position grid at 32x32 instead of 24x24
    for name in ("seg_tiny_mask", "seg_base_deit_linear"):
        cfg = load_config(name)
        with torch.device("meta"):
            ours = count_parameters(build_model(cfg.model).encoder)
            theirs = count_parameters(timm.create_model(cfg.model.backbone))
        assert ours - theirs == (32 * 32 - 24 * 24) * cfg.model.d_model


@pytest.mark.parametrize("backbone,distilled,suffix", [("vit_tiny_patch16_384", False, ".pth"),
                                                       ("deit_tiny_distilled_patch16_224", True, ".safetensors")])
def test_backbone_weights_with_grid_resize(tmp_path, backbone, distilled, suffix):
    src = timm.create_model(backbone)
    file = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, file)
    else:
        torch.save(src.state_dict(), file)
    cfg = load_config("seg_tiny_mask").model
    cfg = type(cfg)(**{**cfg.__dict__, "backbone": backbone, "distilled": distilled})
    model = build_model(cfg)
    load_backbone_weights(model, file, backbone)
    enc = model.encoder
    assert torch.equal(enc.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)
    assert torch.equal(enc.cls_token, src.cls_token)
    n_extra = 2 if distilled else 1
    assert torch.equal(enc.pos_embed[:, :n_extra], src.pos_embed[:, :n_extra])
    old = int((src.pos_embed.shape[1] - n_extra) ** 0.5)
    grid = src.pos_embed[0, n_extra:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(enc.pos_embed[0, n_extra:], want.permute(0, 2, 3, 1).reshape(1024, -1), atol=1e-6)


def test_backbone_weights_errors(tmp_path):
    model = build_model(load_config("seg_tiny_mask").model)
    with pytest.raises(CheckpointError, match="no such backbone weights file"):
        load_backbone_weights(model, tmp_path / "nope.pth", "vit_tiny_patch16_384")
    torch.save(timm.create_model("vit_small_patch16_384").state_dict(), tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match="small.pth"):
        load_backbone_weights(model, tmp_path / "small.pth", "vit_tiny_patch16_384")
