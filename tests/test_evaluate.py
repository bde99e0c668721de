"""Evaluation: the metric pipeline end to end, determinism, sharding, bounded memory, CLI."""
import json
import subprocess
import sys

import pytest
import torch

from harness.config import load_config
from harness.data.ade20k import ADE20K
from harness.data.synth import synthesize
from harness.evaluate import Protocol, evaluate_checkpoint, evaluate_dataset, model_predictor
from harness.models import load_checkpoint

FIXTURE = "tests/fixtures/vit_mask"


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    synthesize(root, train=1, val=3, size=(72, 100), classes=6, seed=1)
    return root


def _fixture_cfg():
    _, cfg = load_checkpoint(FIXTURE)
    return cfg


@pytest.fixture(scope="module")
def fixture_yaml(tmp_path_factory):
    """The parity fixture's run (window 64, stride 48, test scale 64) as a config file."""
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "fixture.yaml"
    path.write_text(yaml.safe_dump(_fixture_cfg().to_dict()))
    return path


def test_oracle_predictions_give_100(ade_root):
    ds = ADE20K(ade_root, "validation")
    cm = evaluate_dataset(lambda item: torch.from_numpy(item["label"]).long().masked_fill(
        torch.from_numpy(item["label"]) == 255, 0), ds, progress=False)
    out = cm.compute()
    assert out["mIoU"] == 100.0 and out["aAcc"] == 100.0
    labelled = (cm.mat.sum(1) > 0).sum().item()
    assert 1 < labelled <= 6  # the generated classes, counted at the original resolution


def test_ss_and_msflip_deterministic_and_sharded_identically(ade_root):
    cfg = _fixture_cfg()
    for ms in (False, True):
        a, proto, n = evaluate_checkpoint(FIXTURE, cfg, ade_root, ms_flip=ms, progress=False)
        b, _, _ = evaluate_checkpoint(FIXTURE, cfg, ade_root, ms_flip=ms, progress=False)
        assert n == 3 and torch.equal(a.mat, b.mat)
        assert a.mat.sum() == 3 * 72 * 100 - _ignored(ade_root)
        assert proto.scales == (tuple(cfg.eval.scales) if ms else (1.0,))


def test_loader_worker_gives_the_same_matrix_and_times_the_model(ade_root):
    model, cfg = load_checkpoint(FIXTURE)
    predict = model_predictor(model, cfg, Protocol.of(cfg, ms_flip=False))
    ds = ADE20K(ade_root, "validation")
    timing = {}
    in_process = evaluate_dataset(predict, ds, cfg.model.n_cls, progress=False)
    loaded = evaluate_dataset(predict, ds, cfg.model.n_cls, progress=False, loader_workers=1, timing=timing)
    assert torch.equal(in_process.mat, loaded.mat) and in_process.mat.sum() > 0
    assert 0 < timing["model_s"] <= timing["wall_s"]


def _ignored(root) -> int:
    return sum(int((item["label"] == 255).sum()) for item in ADE20K(root, "validation"))


def test_one_and_two_ray_workers_give_identical_matrices(ade_root):
    import ray

    cfg = _fixture_cfg()
    one, _, _ = evaluate_checkpoint(FIXTURE, cfg, ade_root, progress=False)
    try:
        two, _, _ = evaluate_checkpoint(FIXTURE, cfg, ade_root, workers=2, progress=False)
    finally:
        ray.shutdown()
    assert torch.equal(one.mat, two.mat)


def test_eval_cli_writes_metrics_and_per_class_csv(ade_root, tmp_path, fixture_yaml, segrepro):
    res = segrepro("eval", str(fixture_yaml), "--checkpoint", FIXTURE, "--data-root", str(ade_root), "--ms-flip",
               "--out", str(tmp_path / "out"), "--json")
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout)
    saved = json.loads((tmp_path / "out" / "msflip_metrics.json").read_text())
    assert saved["mIoU"] == record["mIoU"] and 0 <= record["mIoU"] <= 100
    assert 0 < record["model_share"] <= 1
    assert saved["protocol"] == {"mode": "msflip", "window": 64, "stride": 48, "test_scale": 64,
                                 "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "flip": True, "small_views": "upsample",
                                 "name": "reference", "resize": "fit", "ratio_base": "test_scale",
                                 "label_resolution": "original", "normalization": None, "bookkeeping": "mmseg"}
    assert saved["source"] == "reference" and saved["normalization"] == "vit"
    rows = (tmp_path / "out" / "msflip_per_class.csv").read_text().splitlines()
    assert rows[0] == "class,IoU,Acc" and rows[1].startswith("wall,") and len(rows) == 151
    missing = segrepro("eval", "seg_tiny_mask", "--checkpoint", FIXTURE, "--data-root", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "nope" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_eval_memory_does_not_grow_with_the_split(tmp_path, fixture_yaml):
    synthesize(tmp_path, train=1, val=600, size=(40, 56), classes=4, seed=2)
    code = ("import resource, sys; from harness.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peaks = {}
    for limit in (100, 600):
        res = subprocess.run([sys.executable, "-c", code, "eval", str(fixture_yaml), "--checkpoint", FIXTURE,
                              "--data-root", str(tmp_path), "--limit", str(limit), "--json",
                              "--out", str(tmp_path / f"o{limit}")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        peaks[limit] = int(res.stdout.split("MAXRSS")[1])
        assert json.loads(res.stdout.split("MAXRSS")[0])["images"] == limit
    print("peak RSS KiB", peaks)
    assert peaks[600] <= 1.10 * peaks[100]


def test_bench_cli_reports_figures_with_protocol(fixture_yaml, segrepro):
    res = segrepro("bench", str(fixture_yaml), "--warmup", "1", "--repeats", "3", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    cfg = load_config(fixture_yaml)
    assert r["images_per_s"] > 0 and r["latency_p90_ms"] >= r["latency_median_ms"] > 0
    assert r["slide_latency_median_ms"] > 0 and r["peak_memory_mb"] > 0
    assert r["protocol"]["window"] == cfg.eval.window and r["protocol"]["stride"] == cfg.eval.stride
    assert r["protocol"]["batch_size"] == 1 and r["protocol"]["image_size"] == cfg.eval.window == 64
    assert r["protocol"]["slide_image"] == [64, 85]
    # FLOPs at least those of the two encoder blocks' weight matmuls: 2 * (12 d^2) * tokens each
    tokens = (64 // 16) ** 2 + 1
    assert r["gflops"] * 1e9 > 2 * 2 * (12 * 64 * 64) * tokens
    assert "cpu" in json.dumps(r["device_facts"]).lower()
