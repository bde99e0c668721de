"""Reading MMSeg and PaddleViT checkpoints: by content, safely, with one clear error, and with the
source's options and evaluation protocol in the loaded config."""
import dataclasses
import pickle
import shutil

import pytest
import torch

from harness.config import ConfigError, InputError
from harness.models import CheckpointError, build_model, load_checkpoint
from harness.models.vit import VisionTransformer

from tests.conftest import FIXTURES

MMSEG, PVT = FIXTURES / "mmseg_mask", FIXTURES / "pvt_mask"
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(X)


class _Evil:
    def __reduce__(self):
        import os

        return os.system, ("touch pwned",)


def test_pdparams_with_a_non_numpy_global_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(PVT / "model.pdparams", "rb") as f:
        state = pickle.load(f)  # the fixture itself holds numpy arrays only
    state["encoder.norm.weight"] = _Evil()
    with open(tmp_path / "model.pdparams", "wb") as f:
        pickle.dump(state, f, protocol=4)
    shutil.copy(PVT / "config.yaml", tmp_path)
    with pytest.raises(CheckpointError, match=r"posix\.system is not allowed in a \.pdparams"):
        load_checkpoint(tmp_path / "model.pdparams")
    assert not (tmp_path / "pwned").exists()
    # a truncated file is unreadable, not refused
    (tmp_path / "model.pdparams").write_bytes((PVT / "model.pdparams").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable .pdparams .UnpicklingError: pickle data was truncated"):
        load_checkpoint(tmp_path / "model.pdparams")


def test_formats_are_recognised_by_content_not_name(tmp_path):
    ref_pvt, ref_mm = _logits(load_checkpoint(PVT)[0]), _logits(load_checkpoint(MMSEG)[0])
    (tmp_path / "p").mkdir()
    shutil.copy(PVT / "model.pdparams", tmp_path / "p" / "weights.pth")
    model, cfg = load_checkpoint(tmp_path / "p" / "weights.pth", source_config=PVT / "config.yaml")
    assert cfg.source == "paddlevit" and torch.equal(_logits(model), ref_pvt)
    (tmp_path / "m").mkdir()
    shutil.copy(MMSEG / "checkpoint.pth", tmp_path / "m" / "iter_16.pdparams")
    shutil.copy(next(MMSEG.glob("*.py")), tmp_path / "m" / "run.py")
    model, cfg = load_checkpoint(tmp_path / "m" / "iter_16.pdparams")
    assert cfg.source == "mmseg" and torch.equal(_logits(model), ref_mm)
    # without the .py, the config text mmengine saved in the checkpoint's meta
    (tmp_path / "m" / "run.py").unlink()
    assert torch.equal(_logits(load_checkpoint(tmp_path / "m" / "iter_16.pdparams")[0]), ref_mm)


def test_loaded_configs_carry_the_sources_options_and_protocols():
    _, mm = load_checkpoint(MMSEG)
    m, d = mm.model, mm.model.decoder
    assert (m.ln_eps, m.final_norm_eps, d.ln_eps, d.norm_eps) == (1e-6, 1e-6, 1e-5, 1e-5)
    assert (m.pos_embed_interp, m.pos_embed_resize, m.logits_resize) == ("bicubic", "token_count", "direct")
    assert (mm.eval.protocol, mm.eval.small_views, mm.eval.ratio_base) == ("mmseg", "low_res", "original")
    assert mm.eval.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and mm.model.normalization == "vit"
    for name, eval_norm in (("pvt_mask", "vit"), ("pvt_linear", "deit")):
        _, pv = load_checkpoint(FIXTURES / name)
        m = pv.model
        assert (m.ln_eps, m.final_norm_eps, m.pos_embed_resize, m.normalization) == (1e-6, 1e-5, "never", "deit")
        assert (pv.eval.protocol, pv.eval.normalization, pv.eval.resize, pv.eval.label_resolution,
                pv.eval.bookkeeping, pv.eval.stride, pv.data.test_scale) == (
            "paddlevit", eval_norm, "short_side", "resized", "paddlevit", 48, 64)
    _, pv = load_checkpoint(PVT)
    assert (pv.model.decoder.ln_eps, pv.model.decoder.norm_eps, pv.model.decoder.n_heads) == (1e-6, 1e-5, 1)


def _mmseg_copy(tmp_path, edit_state=None, edit_config=None):
    dst = tmp_path / "mm"
    shutil.copytree(MMSEG, dst)
    ckpt = torch.load(dst / "checkpoint.pth", weights_only=True)
    if edit_state:
        edit_state(ckpt["state_dict"])
    torch.save(ckpt, dst / "checkpoint.pth")
    if edit_config:
        py = next(dst.glob("*.py"))
        py.write_text(edit_config(py.read_text()))
    return dst


def test_mmseg_key_errors_are_listed_in_one_message(tmp_path):
    def edit(sd):
        del sd["backbone.ln1.weight"]
        sd["decode_head.surprise"] = torch.zeros(1)
        sd["backbone.cls_token"] = torch.zeros(1, 1, 3)

    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_mmseg_copy(tmp_path, edit))
    msg = str(err.value)
    assert "missing keys (1): encoder.norm.weight" in msg and "unexpected keys (1): decode_head.surprise" in msg
    assert "encoder.cls_token: checkpoint (1, 1, 3) vs model (1, 1, 64)" in msg


def test_a_0x_patch_embedding_bias_is_used(tmp_path):
    bias = torch.randn(64, generator=torch.Generator().manual_seed(3))
    plain = _logits(load_checkpoint(MMSEG)[0])
    model, _ = load_checkpoint(_mmseg_copy(tmp_path, lambda sd: sd.__setitem__("backbone.patch_embed.projection.bias",
                                                                                 bias)))
    assert torch.equal(model.encoder.patch_embed.proj.bias, bias)
    assert (_logits(model) - plain).abs().max() > 1e-3
    # a config that asks for a bias the checkpoint lacks: a missing key, not a silent zero
    with pytest.raises(CheckpointError, match="missing keys .*encoder.patch_embed.proj.bias"):
        load_checkpoint(_mmseg_copy(tmp_path / "b", edit_config=lambda t: t.replace(
            "patch_size=16,", "patch_bias=True, patch_size=16,")))


def test_mmseg_config_is_read_without_executing_it(tmp_path):
    dst = _mmseg_copy(tmp_path, edit_config=lambda t: t + "\nx = __import__('os').system('touch pwned')\n")
    with pytest.raises(ConfigError, match=r"line \d+: expected a literal"):
        load_checkpoint(dst)
    assert not (dst / "pwned").exists() and not (tmp_path / "pwned").exists()
    with pytest.raises(ConfigError, match="field 'model.decode_head.type': expected SegmenterMaskTransformerHead"):
        load_checkpoint(_mmseg_copy(tmp_path / "u", edit_config=lambda t: t.replace(
            "SegmenterMaskTransformerHead", "UPerHead")))


def test_a_source_checkpoint_without_its_config_is_one_clear_error(tmp_path):
    shutil.copy(PVT / "model.pdparams", tmp_path)
    with pytest.raises(InputError, match="needs its yaml .*--source-config"):
        load_checkpoint(tmp_path / "model.pdparams")


def test_position_grid_resized_only_when_the_token_count_changes():
    def encoder(interp):
        torch.manual_seed(0)
        return VisionTransformer(64, 16, 1, 64, 1, pos_embed_interp=interp).eval()

    bilinear, bicubic = encoder("bilinear"), encoder("bicubic")
    with torch.no_grad():
        same_count = torch.randn(1, 3, 32, 128)  # a 2x8 grid: 16 tokens, as the stored 4x4 grid
        assert torch.equal(bilinear(same_count), bicubic(same_count))
        other = torch.randn(1, 3, 48, 80)  # 3x5: the stored grid is resized, by each rule
        assert (bilinear(other) - bicubic(other)).abs().max() > 1e-4
        strict = VisionTransformer(64, 16, 1, 64, 1, pos_embed_resize="never").eval()
        with pytest.raises(ValueError, match="stored 4x4 grid"):
            strict(other)


def test_logits_resize_options_differ_only_on_padded_inputs():
    _, cfg = load_checkpoint(MMSEG)
    direct = load_checkpoint(MMSEG)[0]
    cropped = build_model(dataclasses.replace(cfg.model, logits_resize="pad_crop"))
    cropped.load_state_dict(direct.state_dict())
    cropped.eval()
    with torch.no_grad():
        assert torch.allclose(direct(X), cropped(X), atol=1e-6)
        padded = torch.randn(1, 3, 45, 70)
        assert (direct(padded) - cropped(padded)).abs().max() > 1e-2


def test_released_checkpoints_are_named_after_their_documented_row():
    from harness.config import load_documented, released_rows, zoo_names
    from harness.models.checkpoint import _zoo_row

    rows = released_rows()
    documented = {d["config"] for d in load_documented()}
    assert set(rows) <= documented and not set(rows) & set(zoo_names())
    small = rows["seg_small_linear"]
    arch = {"patch_size": 16, "d_model": small.d_model, "n_layers": 12, "n_heads": small.n_heads, "image_size": 512,
            "n_cls": 150}
    assert _zoo_row({**arch, "decoder": {"name": "linear"}}) == ("seg_small_linear", "vit_small_patch16_384")
    assert _zoo_row({**arch, "decoder": {"name": "mask_transformer"}})[0] == "seg_small_mask"
    assert _zoo_row({**arch, "d_model": 64, "n_heads": 1, "decoder": {"name": "linear"}}) is None
