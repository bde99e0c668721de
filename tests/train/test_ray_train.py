"""Ray Train end to end: two CPU workers on gloo, one killed mid-run and restarted from the
last checkpoint, metrics in MLflow; a driver SIGKILLed right after a checkpoint and rerun from
it, its run directory locked meanwhile, its wall time counted, a truncated checkpoint passed
over and a result without a usable checkpoint not trusted."""
import collections
import dataclasses
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.config import InputError
from harness.lock import holder
from harness.models import load_checkpoint
from harness.train.checkpoint import RNG_FILE
from harness.train.driver import LEDGER_FILE, finished_result, release_placement_groups, resume_point, train
from tests.train.hooks import KillRank, Trace

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from harness.raylib import ensure_ray

    ensure_ray()
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def test_a_placement_group_left_behind_is_released(local_ray):
    """What a fit whose Ray Train controller failed leaves: a group holding CPUs that nothing uses."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    group = placement_group([{"CPU": 1}])
    ray.get(group.ready(), timeout=60)
    assert placement_group_table(group)["state"] == "CREATED"
    release_placement_groups([group.id.hex()])
    assert placement_group_table(group)["state"] == "REMOVED"
    release_placement_groups([group.id.hex()])  # one Ray removed already is left as it is


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_worker_restarts_from_last_checkpoint(local_ray, tiny_cfg, data_root, tmp_path):
    # 2 ranks x 2 images per iteration; checkpoints at 4, 8 and 10, reports at 4, 5, 8 and 10.
    n, ckpt, log, kill_at = 10, 4, 5, 7
    cfg = tiny_cfg(optim={"iterations": n, "checkpoint_interval": ckpt, "log_interval": log, "eval_interval": n})
    run_dir, trace, marker = tmp_path / "run", tmp_path / "trace.jsonl", tmp_path / "killed"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    records = []
    out = train(cfg, data_root, run_dir, workers=2, tracking_uri=uri, progress_callback=records.append,
                hooks=[Trace(str(trace)), KillRank(rank=1, after=kill_at - 1, marker=str(marker))])

    assert marker.exists(), "rank 1 was killed once"
    assert out["iterations"] == n
    lines = _trace(trace)
    starts = collections.defaultdict(set)
    for rec in lines:
        starts[rec["pid"]].add(rec["start"])
    assert all(len(s) == 1 for s in starts.values())
    # two attempts on each rank: from scratch, then from the checkpoint before the kill
    assert sorted(s.pop() for s in starts.values()) == [0, 0, ckpt, ckpt]
    count = collections.Counter((r["rank"], r["iteration"]) for r in lines)
    last_ckpt = (kill_at - 1) // ckpt * ckpt
    for rank in (0, 1):
        for t in range(1, n + 1):
            # replayed once: the iterations after the last checkpoint that ran before the kill
            expected = 2 if last_ckpt < t < kill_at else 1
            assert count[rank, t] == expected, (rank, t)
    # the replay resumed exactly: same loss on each rank as the first time
    by_attempt = collections.defaultdict(dict)
    for r in lines:
        by_attempt[r["rank"], r["iteration"]][r["start"]] = r["loss"]
    for rank in (0, 1):
        for t in range(last_ckpt + 1, kill_at):
            first, again = by_attempt[rank, t][0], by_attempt[rank, t][ckpt]
            assert again == pytest.approx(first, abs=1e-6), (rank, t)

    # progress reached the driver; the final checkpoint holds the model and both ranks' RNGs
    assert [r["iteration"] for r in records][-1] == n and "val/mIoU" in records[-1]
    model, loaded = load_checkpoint(out["checkpoint"])
    # the resolved config: the smoke profile's "auto" init became random init (no weights here)
    assert loaded == dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init="scratch"))
    ckpt_dir = Path(out["checkpoint"]).parent
    assert all((ckpt_dir / RNG_FILE.format(rank=r)).is_file() for r in (0, 1)), ckpt_dir
    assert out["val"]["val/mIoU"] == pytest.approx(records[-1]["val/mIoU"])
    # the run's identity and data are in the result
    assert out["data_root"] == str(Path(data_root).resolve()) and len(out["training_id"]) == 16
    assert out["train_fingerprint"]["split"] == "training" and out["train_fingerprint"]["images"] == 16

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.iterations"] == str(n)
    steps = {k: sorted({m.step for m in client.get_metric_history(run.info.run_id, k)})
             for k in ("train/loss", "train/lr", "val/mIoU")}
    reported = [t for t in range(1, n + 1) if t % ckpt == 0 or t % log == 0 or t == n]
    assert steps["train/loss"] == steps["train/lr"] == reported
    assert steps["val/mIoU"] == [n]

    # resuming the finished run trains nothing: its saved result comes back as it was
    again = train(cfg, data_root, run_dir, workers=2, tracking_uri=uri, hooks=[Trace(str(trace))])
    assert again["already_finished"] and again["iterations"] == n and again["checkpoint"] == out["checkpoint"]
    assert again["wall_time_s"] == out["wall_time_s"] and len(_trace(trace)) == len(lines)

    # the run directory now holds a run: starting over needs resume, resuming needs the same schedule
    with pytest.raises(InputError, match="already holds a training run"):
        train(cfg, data_root, run_dir, workers=2, resume=False)
    with pytest.raises(InputError, match=r"optim\.lr .* -> 0\.5"):
        train(tiny_cfg(optim={"iterations": n, "lr": 0.5}), data_root, run_dir, workers=2)



# A driver of its own (train() in a subprocess on the module's Ray), SIGKILLed by its rank 0 right
# after the checkpoint of iteration AFTER was persisted.
DRIVER = """
import os, pickle, sys
from harness.train.driver import train
from tests.train.hooks import KillDriver, Trace
cfg_file, data_root, run_dir, address, trace, after = sys.argv[1:]
with open(cfg_file, "rb") as f:
    cfg = pickle.load(f)
train(cfg, data_root, run_dir, address=address, hooks=[Trace(trace), KillDriver(os.getpid(), int(after))])
"""


def _wait_for_holder(run_dir: Path, proc: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        info = holder(run_dir)
        if info and "pid" in info:
            return info
        time.sleep(0.05)
    raise AssertionError(f"the driver never held {run_dir} (exit code {proc.poll()})")


def test_driver_killed_after_a_checkpoint_resumes_from_it(
        local_ray, tiny_cfg, data_root, tmp_path, capfd):
    n, after = 6, 4
    cfg = tiny_cfg(model={"init": "scratch"}, optim={"iterations": n, "checkpoint_interval": 2, "log_interval": 2})
    run_dir, trace = tmp_path / "run", tmp_path / "trace.jsonl"
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "cfg.pkl"), str(data_root),
                                 str(run_dir), local_ray, str(trace), str(after)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        # while it trains, a second `segrepro train` on its run directory stops at once, naming it
        assert _wait_for_holder(run_dir, proc)["pid"] == proc.pid
        t0 = time.monotonic()
        rc = main(["train", "seg_tiny_mask", "--profile", "smoke", "--data-root", str(data_root),
                   "--run-dir", str(run_dir)])
        err = capfd.readouterr().err
        assert rc == 2 and time.monotonic() - t0 < 10
        assert f"in use by PID {proc.pid} on {socket.gethostname()} (train" in err, err
        assert proc.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = _trace(trace)
    assert [r["iteration"] for r in killed] == list(range(1, after + 1)) and killed[-1]["checkpointed"]

    started = time.monotonic()
    out = train(cfg, data_root, run_dir, hooks=[Trace(str(trace))])
    elapsed = time.monotonic() - started
    resumed = _trace(trace)[after:]
    assert out["start_iteration"] == after and out["iterations"] == n
    assert [(r["start"], r["iteration"]) for r in resumed] == [(after, t) for t in range(after + 1, n + 1)]

    # wall time adds up over both attempts, the killed one up to its last heartbeat
    attempts = json.loads((run_dir / LEDGER_FILE).read_text())["attempts"]
    assert [a["pid"] for a in attempts] == [proc.pid, os.getpid()]
    assert attempts[0]["wall_s"] > 1 and attempts[1]["wall_s"] <= elapsed
    assert out["attempts"] == 2
    assert out["wall_time_s"] == pytest.approx(attempts[0]["wall_s"] + attempts[1]["wall_s"])
    assert json.loads((run_dir / "train_result.json").read_text())["wall_time_s"] == out["wall_time_s"]

    # The saved result is trusted only for this training identity and while its checkpoint loads
    assert finished_result(run_dir, cfg, data_root) == out
    other = tiny_cfg(model={"init": "scratch"}, optim={"iterations": n, "checkpoint_interval": 2, "lr": 0.5})
    assert finished_result(run_dir, other, data_root) is None
    final = Path(out["checkpoint"])
    intact = final.read_bytes()
    final.write_bytes(intact[:len(intact) // 2])  # as a full disk leaves it
    assert finished_result(run_dir, cfg, data_root) is None
    # the driver passes over the truncated checkpoint, naming it, for the killed driver's (the
    # rerun above showed workers resume from the driver's choice; test_loop.py reruns past one)
    capfd.readouterr()
    assert resume_point(run_dir, cfg).iteration == after
    err = capfd.readouterr().err
    assert err.startswith(f"segrepro: skipped an unusable checkpoint: {final}: unreadable (") and err.count("\n") == 1
    final.write_bytes(intact)
    assert finished_result(run_dir, cfg, data_root) == out
    shutil.rmtree(final.parent)
    assert finished_result(run_dir, cfg, data_root) is None
