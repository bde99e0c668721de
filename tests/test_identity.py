"""Run identity: what changes the trained weights changes the training identity, nothing else
does; a dataset is the same data wherever it lies and different once its content differs."""
import dataclasses
import json
import shutil

import pytest

from harness.config import load_config
from harness.data.fingerprint import split_fingerprint
from harness.data.synth import synthesize
from harness.identity import bench_key, bench_settings, eval_key, training_id


@pytest.fixture(scope="module")
def cfg():
    return load_config("seg_tiny_mask", profile="smoke")


def _with(cfg, section, **changes):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def test_training_identity_follows_the_weights_only(cfg):
    base = training_id(cfg, "split-a")
    same = [dataclasses.replace(cfg, description="a typo fixed", profile="renamed"),
            _with(cfg, "data", num_workers=cfg.data.num_workers + 3),
            _with(cfg, "optim", log_interval=7, eval_interval=9, checkpoint_interval=11),
            _with(cfg, "eval", stride=cfg.eval.stride - 1), _with(cfg, "bench", repeats=99)]
    assert {training_id(c, "split-a") for c in same} == {base}
    changed = [_with(cfg, "optim", lr=cfg.optim.lr * 2), _with(cfg, "optim", seed=1), _with(cfg, "optim", amp="bf16"),
               _with(cfg, "model", init_sha256="ab" * 32), _with(cfg, "data", crop_size=cfg.data.crop_size // 2),
               dataclasses.replace(cfg, recipe="mmseg")]
    ids = {training_id(c, "split-a") for c in changed}
    assert base not in ids and len(ids) == len(changed)
    assert training_id(cfg, "split-b") != base
    assert eval_key(base, "sha", {"mode": "ss"}, "val-a") != eval_key(base, "sha", {"mode": "ss"}, "val-b")


def test_bench_key_covers_both_modes_settings(cfg):
    base = bench_key("t", bench_settings(cfg, 1), "cpu")
    # the per-worker batch of the training steps is no training setting: the key alone tells it
    changed = [bench_settings(cfg, 2), bench_settings(_with(cfg, "bench", repeats=99), 1),
               bench_settings(_with(cfg, "optim", amp="bf16"), 1), bench_settings(_with(cfg, "data", crop_size=32), 1)]
    keys = {bench_key("t", b, "cpu") for b in changed}
    assert base not in keys and len(keys) == len(changed)
    assert bench_settings(cfg, 2)["train"] == {"crop": 64, "batch_size": cfg.optim.batch_size // 2, "precision": "fp32"}
    # a benchmark settings record of before the training mode (no "train") is another key
    old = {k: v for k, v in bench_settings(cfg, 1).items() if k != "train"}
    assert bench_key("t", old, "cpu") != base


def test_split_fingerprint_is_the_content_wherever_it_lies(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGREPRO_CACHE", str(tmp_path / "cache"))
    synthesize(tmp_path / "a", train=6, val=2, size=(32, 40), classes=4, seed=0)
    first = split_fingerprint(tmp_path / "a", "training")
    assert (first["images"], first["files"]) == (6, 12) and first["bytes"] > 0
    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # new mtimes, same content
    assert split_fingerprint(tmp_path / "copy", "training") == first
    assert split_fingerprint(tmp_path / "a", "validation")["fingerprint"] != first["fingerprint"]

    # one image rewritten with other bytes of the same size: other data
    img = sorted((tmp_path / "copy").glob("ADEChallengeData2016/images/training/*.jpg"))[0]
    data = img.read_bytes()
    mid = len(data) // 2
    img.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 16]) + data[mid + 16:])
    assert split_fingerprint(tmp_path / "copy", "training")["fingerprint"] != first["fingerprint"]

    # computed once per tree state: the second call answers from the cache
    (cached,) = [p for p in (tmp_path / "cache").rglob("*.json")
                 if json.loads(p.read_text())["fingerprint"] == first["fingerprint"]]
    cached.write_text(json.dumps({**first, "fingerprint": "from-the-cache"}))
    assert split_fingerprint(tmp_path / "a", "training")["fingerprint"] == "from-the-cache"
