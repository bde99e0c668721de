"""The training benchmark: the training loop's own step at the configuration's crop, per-worker
batch and precision, timed with its protocol; from Python and from the command line."""
import json

import pytest
import torch

from harness.benchmark import benchmark_train, train_step_fn
from harness.config import load_config


@pytest.fixture(scope="module")
def experiments(tmp_path_factory, tiny_experiments):
    return tiny_experiments(tmp_path_factory.mktemp("bench") / "experiments", {})


@pytest.fixture
def cfg(experiments, monkeypatch):
    monkeypatch.setenv("SEGREPRO_EXPERIMENTS", str(experiments))
    return load_config("tiny_test", profile="smoke")  # crop 64, global batch 4


def test_train_step_is_the_loops_and_updates_the_weights(cfg):
    step, training = train_step_fn(cfg, torch.device("cpu"), 2)
    _, again = train_step_fn(cfg, torch.device("cpu"), 2)
    before = {k: v.detach().clone() for k, v in training.model.state_dict().items()}
    # built as the loop builds it: seeded, so every worker (and every benchmark) starts alike
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in before.items())
    lr = training.optimizer.param_groups[0]["lr"]
    loss = step()
    assert loss > 0 and torch.isfinite(torch.tensor(loss))
    changed = [k for k, v in training.model.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("decoder.") for k in changed)
    assert training.optimizer.param_groups[0]["lr"] < lr  # the schedule stepped too


def test_train_bench_figures_agree_with_each_other(cfg):
    r = benchmark_train(cfg, workers=2, warmup=1, repeats=5)
    p = r["protocol"]
    assert (p["crop"], p["batch_size"], p["workers"]) == (64, cfg.optim.batch_size // 2, 2)
    assert (p["precision"], p["precision_configured"], p["device"]) == ("fp32", "fp32", "cpu")
    assert p["threads"] == torch.get_num_threads() and (p["warmup"], p["repeats"]) == (1, 5)
    assert "random" in p["data"] and p["concurrent_load"]
    assert r["images_per_s"] == pytest.approx(p["batch_size"] / (r["step_median_ms"] / 1e3))
    assert r["step_p90_ms"] >= r["step_median_ms"] > 0
    assert "RSS" in r["peak_memory_kind"] and r["peak_memory_kind"] == p["peak_memory_kind"]
    # the resident set before the steps holds the model, its gradients and momentum
    assert r["peak_memory_mb"] >= p["memory_at_start_mb"] > 3 * r["params_m"] * 1e6 * 4 / 2**20

    # the peak of this process while timing, not of its lifetime: the steps add at least one
    # logits tensor, at a batch whose logits (39 MB) glibc always maps afresh (above its 32 MB
    # largest mmap threshold) rather than reusing memory earlier work left resident
    big = benchmark_train(cfg, batch_size=16, warmup=0, repeats=1)
    logits_mb = 16 * cfg.model.n_cls * 64 * 64 * 4 / 2**20
    assert big["peak_memory_mb"] - big["protocol"]["memory_at_start_mb"] > logits_mb


def test_bench_cli_train_mode(experiments, monkeypatch, segrepro):
    monkeypatch.setenv("SEGREPRO_EXPERIMENTS", str(experiments))
    common = ("bench", "tiny_test", "--profile", "smoke", "--warmup", "1", "--repeats", "2")
    res = segrepro(*common, "--mode", "train", "--workers", "2", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert (r["config"], r["protocol"]["batch_size"], r["protocol"]["crop"]) == ("tiny_test", 2, 64)
    assert r["step_p90_ms"] >= r["step_median_ms"] > 0 and r["peak_memory_mb"] > 0

    res = segrepro(*common, "--mode", "both")
    assert res.returncode == 0, res.stderr
    assert "tiny_test: " in res.stdout and "tiny_test training: " in res.stdout
    assert "batch 4 per worker, crop 64x64, fp32" in res.stdout

    res = segrepro(*common, "--mode", "train", "--workers", "3")
    assert res.returncode == 2 and "--workers 3" in res.stderr and "optim.batch_size 4" in res.stderr
