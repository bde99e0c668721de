"""Evaluation protocols: each source's rules as named EvalConfig fields, applied to any checkpoint,
through ``segrepro eval`` and into the report's released-checkpoints view."""
import json

import numpy as np
import pytest
import torch

from harness.cli import main
from harness.config import InputError, apply_protocol, load_config, normalization_name
from harness.data.synth import synthesize
from harness.evaluate import Protocol, model_predictor
from harness.inference import view_size
from harness.models import build_model, load_checkpoint
from reports.build import build_report

from tests.conftest import FIXTURES

PVT = FIXTURES / "pvt_mask"


def test_view_sizes_of_each_resize_rule_and_ratio_base():
    # PaddleViT truncates the long side and has no cap; mmcv rounds and caps it at 4x the scale
    assert view_size(375, 500, 512, resize="short_side") == (512, 682)
    assert view_size(375, 500, 512, resize="fit") == (512, 683)
    assert view_size(512, 4000, 512, resize="short_side") == (512, 4000)
    assert view_size(512, 4000, 512, resize="fit") == (262, 2048)
    # MMSeg 1.x ratios scale the original image; 0.x and the reference fit (2048 r, 512 r)
    assert view_size(375, 500, 512, 0.5, ratio_base="original") == (188, 250)
    assert view_size(375, 500, 512, 0.5) == (256, 341)


def test_recipes_set_each_sources_options():
    pv = load_config("seg_large_mask_640", recipe="paddlevit")
    assert (pv.model.image_size, pv.data.crop_size, pv.data.test_scale, pv.eval.window, pv.eval.stride) == (512,) * 5
    assert pv.optim.amp == "fp32" and pv.model.normalization == "deit"
    assert (pv.eval.protocol, pv.eval.resize, pv.eval.label_resolution, pv.eval.bookkeeping) == (
        "paddlevit", "short_side", "resized", "paddlevit")
    # ViT rows are evaluated with 127.5/127.5 although trained with ImageNet statistics; DeiT rows with ImageNet
    assert normalization_name(pv.eval.normalization, pv.model) == "vit"
    deit = load_config("seg_base_deit_mask", recipe="paddlevit")
    assert normalization_name(deit.eval.normalization, deit.model) == "deit"
    with torch.device("meta"):
        model = build_model(load_config("seg_tiny_mask", recipe="paddlevit").model)
    enc, dec = model.encoder, model.decoder
    assert (enc.blocks[0].norm1.eps, enc.norm.eps, dec.blocks[0].norm2.eps, dec.decoder_norm.eps,
            dec.mask_norm.eps) == (1e-6, 1e-5, 1e-6, 1e-5, 1e-5)
    mm = load_config("seg_tiny_mask", recipe="mmseg")
    with torch.device("meta"):
        model = build_model(mm.model)
    enc, dec = model.encoder, model.decoder
    assert (enc.blocks[0].norm1.eps, enc.norm.eps, dec.blocks[0].norm1.eps, dec.mask_norm.eps) == (1e-6, 1e-6, 1e-5, 1e-5)
    assert (enc.pos_embed_interp, model.logits_resize, mm.eval.small_views) == ("bicubic", "direct", "low_res")
    ref = load_config("seg_tiny_mask")
    assert (ref.eval.protocol, normalization_name(ref.eval.normalization, ref.model), ref.eval.bookkeeping) == (
        "reference", "vit", "mmseg")


def test_apply_protocol_keeps_the_checkpoints_sizes():
    _, cfg = load_checkpoint(PVT)
    assert apply_protocol(cfg, "paddlevit") is cfg  # its own protocol, stride as its yaml gives it
    ref = apply_protocol(cfg, "reference")
    assert (ref.eval.protocol, ref.eval.window, ref.eval.stride, ref.data.test_scale) == ("reference", 64, 32, 64)
    assert (ref.eval.resize, ref.eval.label_resolution, ref.eval.normalization, ref.eval.bookkeeping) == (
        "fit", "original", None, "mmseg")
    assert normalization_name(ref.eval.normalization, ref.model) == "deit"  # PaddleViT trains with ImageNet
    assert ref.model == cfg.model
    _, off = load_checkpoint(FIXTURES / "vit_mask")
    pv = apply_protocol(off, "paddlevit")
    assert (pv.eval.stride, pv.eval.small_views, pv.eval.label_resolution) == (64, "upsample", "resized")
    with pytest.raises(InputError, match="--protocol detectron: unknown protocol; expected one of mmseg, paddlevit, "
                                         "reference"):
        apply_protocol(off, "detectron")


def test_label_resolution_of_each_protocol():
    model, cfg = load_checkpoint(PVT)
    rng = np.random.default_rng(0)
    item = {"image": rng.integers(0, 256, (75, 100, 3), dtype=np.uint8),
            "label": rng.integers(0, 6, (75, 100)).astype(np.uint8)}
    pred, label = model_predictor(model, cfg, Protocol.of(cfg, False))(item)
    assert pred.shape == label.shape == (64, 85)  # short side 64, long side int(64 * 100 / 75)
    assert set(label.unique().tolist()) <= set(np.unique(item["label"]).tolist())  # nearest: no new values
    ref = apply_protocol(cfg, "reference")
    assert model_predictor(model, ref, Protocol.of(ref, False))(item).shape == (75, 100)


def test_eval_under_each_protocol_and_the_released_checkpoints_view(tmp_path, capsys):
    root = synthesize(tmp_path / "ade", train=1, val=2, size=(75, 100), classes=150, seed=4)
    records = {}
    for protocol in (None, "reference", "mmseg"):
        argv = ["eval", "--checkpoint", str(PVT), "--data-root", str(root), "--run-dir", str(tmp_path / "runs"),
                "--out", str(tmp_path / f"out-{protocol}"), "--json"] + (["--protocol", protocol] if protocol else [])
        assert main(argv) == 0
        record = json.loads(capsys.readouterr().out)
        records[record["protocol"]["name"]] = record
    assert set(records) == {"paddlevit", "reference", "mmseg"}
    assert {r["source"] for r in records.values()} == {"paddlevit"}
    assert records["paddlevit"]["normalization"] == "vit" and records["reference"]["normalization"] == "deit"
    assert records["paddlevit"]["protocol"]["stride"] == 48 and records["reference"]["protocol"]["stride"] == 32
    report = build_report(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", tmp_path / "report")
    (row,) = report["released"]
    assert (row["source"], row["config"], row["eval"], row["own protocol"]) == ("PaddleViT", "pvt_mask", "ss", "paddlevit")
    assert row["under own"] == row["under PaddleViT"] == pytest.approx(records["paddlevit"]["mIoU"])
    assert row["under reference"] == pytest.approx(records["reference"]["mIoU"])
    assert row["under MMSeg"] == pytest.approx(records["mmseg"]["mIoU"])
    assert row["documented"] is None  # a fixture matches no zoo row
    assert row["data"] == "generated (2 images)"  # each eval run records the data it read
    assert "Released checkpoints" in (tmp_path / "report" / "report.md").read_text()
