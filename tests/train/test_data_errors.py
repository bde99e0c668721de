"""A bad dataset file met during a run, and an unusable store: one message naming the file and
what to do, exit 2, the traceback in the run's log, no Ray retries (--debug: test_cli_boundary)."""
import json
import os
from pathlib import Path

import pytest

from harness.data.ade20k import list_pairs
from harness.data.synth import synthesize
from harness.train.driver import LEDGER_FILE
from harness.train.loop import epoch_indices

PROFILE = """description: a few iterations of a two-layer model, for tests
overrides:
  model: {init: scratch}
  data: {crop_size: 64, train_scale: [256, 64], test_scale: 64, num_workers: 0}
  optim: {iterations: 8, batch_size: 2, lr: 1e-2, min_lr: 0.0001, eval_interval: 1000,
          checkpoint_interval: 1000, log_interval: 1}
  eval: {window: 64, stride: 48, batch_size: 4, scales: [1.0]}
  bench: {warmup: 1, repeats: 2}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_experiments):
    """Ray for the module, experiments with ``tiny_test`` and profile ``bad``, and a dataset whose
    training image of the second batch is a truncated JPEG (the first batch trains, so a retried
    attempt would train it again)."""
    import ray

    from harness.config import load_config
    from harness.raylib import ensure_ray

    root = tmp_path_factory.mktemp("data_errors")
    exp = tiny_experiments(root / "experiments", {"bad": PROFILE})
    old = os.environ.get("SEGREPRO_EXPERIMENTS")
    os.environ["SEGREPRO_EXPERIMENTS"] = str(exp)
    data = root / "data"
    synthesize(data, train=8, val=2, size=(64, 80), classes=4, seed=0)
    cfg = load_config("tiny_test", profile="bad")
    pairs = list_pairs(data, "training")
    # rank 1's second image with two workers, in the second batch with one
    second_batch = epoch_indices(len(pairs), cfg.optim.seed, 0, 1, 2)[1]
    assert second_batch in epoch_indices(len(pairs), cfg.optim.seed, 0, 0, 1)[2:4]
    bad = pairs[second_batch][1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    ensure_ray()
    yield {"data": data, "bad": bad, "cfg": cfg}
    ray.shutdown()
    if old is None:
        os.environ.pop("SEGREPRO_EXPERIMENTS", None)
    else:
        os.environ["SEGREPRO_EXPERIMENTS"] = old


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("segrepro: error")]


def test_truncated_image_under_train_is_one_message(env, segrepro, tmp_path):
    run_dir = tmp_path / "run"
    # two DDP ranks: the one that meets the file is not rank 0, and both stop together
    res = segrepro("train", "tiny_test", "--profile", "bad", "--data-root", env["data"], "--run-dir", run_dir,
                   "--workers", 2)
    assert res.returncode == 2, res.stderr[-3000:]
    (line,) = _errors(res.stderr)
    assert f"bad dataset file images/training/{env['bad'].name}" in line and "truncated" in line
    assert "segrepro data check --root" in line and "--resume" in line
    assert "Traceback" not in res.stderr
    log = run_dir / "segrepro.log"
    assert f"full traceback in {log}" in res.stderr
    assert "Traceback (most recent call last)" in log.read_text() and "DataError" in log.read_text()
    assert len(json.loads((run_dir / LEDGER_FILE).read_text())["attempts"]) == 1


def test_truncated_image_under_reproduce_fails_the_configuration_naming_it(env, segrepro, tmp_path):
    from mlflow import MlflowClient

    from harness.contract import ERROR, EXPERIMENT, KIND, KIND_CONFIG

    run_dir = tmp_path / "rep"
    res = segrepro("reproduce", "--configs", "tiny_test", "--profile", "bad", "--data-root", env["data"],
                   "--run-dir", run_dir)
    assert res.returncode == 2, res.stderr[-3000:]
    (line,) = _errors(res.stderr)
    assert f"images/training/{env['bad'].name}" in line
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND}` = '{KIND_CONFIG}'")
    assert env["bad"].name in run.data.tags[ERROR][:120]  # the report's status cell keeps 120 characters
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("store, message", [
    ("{tmp}", "is not a file"),
    ("/sys/segrepro-test/mlflow.db", "cannot create its directory"),
])
def test_an_unusable_store_fails_at_once_in_one_line(env, segrepro, tmp_path, store, message):
    uri = "sqlite:///" + store.format(tmp=tmp_path)
    res = segrepro("train", "tiny_test", "--profile", "bad", "--data-root", env["data"], "--run-dir",
                   tmp_path / "run", "--tracking-uri", uri)
    assert res.returncode == 2
    (line,) = _errors(res.stderr)
    assert message in line and "Traceback" not in res.stderr
    assert not Path(tmp_path / "run" / "ray").exists()  # refused before any training
