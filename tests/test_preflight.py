"""`segrepro reproduce --preflight`: a bad file stops it before any measurement, the full data
check is cached by the dataset fingerprint, a tiny configuration is measured and projected
(a bad file met during training: tests/train/test_data_errors.py)."""
import json
import shutil

import pytest

from harness.cli import main
from harness.config import load_config
from harness.data.synth import synthesize
from harness.data.fingerprint import CACHE_ENV
from harness.preflight import format_report, full_data_check

TINY_PROFILE = """description: a few iterations of a two-layer model, for tests
overrides:
  model: {init: scratch}
  data: {crop_size: 64, train_scale: [256, 64], test_scale: 64, num_workers: 1}
  optim: {iterations: 12, batch_size: 2, lr: 0.01, min_lr: 0.0001, eval_interval: 5,
          checkpoint_interval: 1000, log_interval: 1}
  eval: {window: 64, stride: 48, batch_size: 4, scales: [0.75, 1.0]}
"""
DATASET = "ADEChallengeData2016"


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_experiments):
    """A copy of experiments/ with a two-layer zoo row and a tiny profile, a generated dataset,
    a private cache; Ray started with them and shut down after the module (its workers keep the
    environment they started with)."""
    import ray

    root = tmp_path_factory.mktemp("preflight")
    exp = tiny_experiments(root / "experiments", {"tiny": TINY_PROFILE})
    synthesize(root / "data", train=8, val=2, size=(64, 80), classes=4, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGREPRO_EXPERIMENTS", str(exp))
        mp.setenv(CACHE_ENV, str(root / "cache"))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        yield {"root": root, "data": root / "data", "cache": root / "cache"}
        ray.shutdown()


def _copy(env, tmp_path):
    shutil.copytree(env["data"] / DATASET, tmp_path / "data" / DATASET)
    return tmp_path / "data"


def _truncate(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    return path


def _preflight(env, data, run_dir, *extra):
    return main(["reproduce", "--configs", "tiny_test", "--profile", "tiny", "--data-root", str(data),
                 "--run-dir", str(run_dir), "--preflight", *extra])


def test_truncated_jpeg_fails_the_preflight_naming_it(env, tmp_path, capsys):
    data = _copy(env, tmp_path)
    bad = _truncate(data / DATASET / "images" / "validation" / "ADE_val_00000002.jpg")
    assert _preflight(env, data, tmp_path / "run", "--json") == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    (check,) = [c for c in out["checks"] if c["name"] == "data full check"]
    assert check["status"] == "fail" and check["detail"].startswith(str(bad))
    assert [c["error"] for c in out["configs"]] == ["not measured: the data check failed"]
    # the other checks still ran and passed
    assert {c["name"]: c["status"] for c in out["checks"]}["run directory"] == "pass"


def test_full_check_is_cached_by_fingerprint(env, tmp_path):
    data = _copy(env, tmp_path)
    first = full_data_check(data)
    assert first["ok"] and not first["cached"]
    assert (env["cache"] / "data-check-1" / f"{first['fingerprint']}.json").is_file()
    again = full_data_check(data)
    assert again["cached"] and again["fingerprint"] == first["fingerprint"]
    assert again["checked_at"] == first["checked_at"]
    # a changed dataset is a new fingerprint, checked again
    base = data / DATASET
    shutil.copy(base / "images/training/ADE_train_00000001.jpg", base / "images/training/ADE_train_00000009.jpg")
    shutil.copy(base / "annotations/training/ADE_train_00000001.png", base / "annotations/training/ADE_train_00000009.png")
    changed = full_data_check(data)
    assert changed["ok"] and not changed["cached"] and changed["fingerprint"] != first["fingerprint"]
    assert changed["pairs"] == first["pairs"] + 1
    # a failure is not cached: it is found every time
    bad = _truncate(base / "images/training/ADE_train_00000009.jpg")
    for _ in range(2):
        failed = full_data_check(data)
        assert not failed["ok"] and not failed["cached"] and failed["problems"][0].startswith(str(bad))


def test_preflight_measures_and_projects_a_configuration(env, tmp_path, capsys):
    assert _preflight(env, env["data"], tmp_path / "run", "--preflight-iterations", "2", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and all(c["status"] == "pass" for c in out["checks"])
    assert {c["name"]: c["detail"] for c in out["checks"]}["weights"] == "tiny_test: random init (from scratch)"
    (row,) = out["configs"]
    m, p = row["measured"], row["projection"]
    cfg = load_config("tiny_test", profile="tiny")
    assert (m["per_worker_batch"], m["crop"], m["precision"], m["iterations"]) == (2, 64, "fp32", 2)
    for key in ("loader_s_per_batch", "step_s", "peak_memory_mb", "eval_ss_s", "eval_msflip_s"):
        assert m[key] > 0, key
    # one loader process: the iteration waits for the slower of the step and the loader
    assert p["iteration_s"] == pytest.approx(max(m["step_s"], m["loader_s_per_batch"]))
    assert p["train_s"] == pytest.approx(cfg.optim.iterations * p["iteration_s"])
    assert p["val_evals"] == 3  # at 5, 10 and the end (12)
    assert p["val_during_training_s"] == pytest.approx(3 * 2 * m["eval_ss_s"])
    assert p["final_eval_s"] == pytest.approx(2 * (m["eval_ss_s"] + m["eval_msflip_s"]))
    assert p["wall_s"] == pytest.approx(p["train_s"] + p["val_during_training_s"] + p["final_eval_s"])
    assert p["gpu_hours"] == 0  # a CPU cluster
    assert out["total"]["wall_s"] == pytest.approx(p["wall_s"])

    table = format_report(out)
    for header in ("loader s/it", "step s/it", "peak MB", "ss s/img", "ms+flip s/img", "full schedule", "GPU-h",
                   "assumes:", "preflight: everything passed"):
        assert header in table, header
    assert f"{m['step_s']:.3f}" in table.split("tiny_test", 1)[1]


def test_reproduce_refuses_what_the_cluster_cannot_run(env, tmp_path, capsys):
    args = ["reproduce", "--configs", "tiny_test", "--profile", "tiny", "--data-root", str(env["data"]),
            "--run-dir", str(tmp_path / "run"), "--gpus-per-worker", "1"]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segrepro: error")]
    assert errors == ["segrepro: error: --workers 1 --gpus-per-worker 1: train asks 1 GPU, the cluster has 0"]
    assert not (tmp_path / "run" / "configs").exists()
