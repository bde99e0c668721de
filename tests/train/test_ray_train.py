"""Ray Train end to end: two CPU workers on gloo, one killed mid-run and restarted from the
last checkpoint, metrics in MLflow."""
import collections
import dataclasses
import json
from pathlib import Path

import pytest

from harness.config import InputError
from harness.models import load_checkpoint
from harness.train.checkpoint import RNG_FILE
from harness.train.driver import train
from harness.train.loop import KILL_ENV, TRACE_ENV


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from harness.raylib import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


def test_killed_worker_restarts_from_last_checkpoint(local_ray, tiny_cfg, data_root, tmp_path, monkeypatch):
    # 2 ranks x 2 images per iteration; checkpoints at 4 and 8, reports at 4, 5, 8 and 10.
    n, ckpt, log, kill_at = 10, 4, 5, 7
    cfg = tiny_cfg(optim={"iterations": n, "checkpoint_interval": ckpt, "log_interval": log, "eval_interval": n})
    trace, marker = tmp_path / "trace.jsonl", tmp_path / "killed"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    monkeypatch.setenv(KILL_ENV, f"1:{kill_at}:{marker}")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    records = []
    out = train(cfg, data_root, tmp_path / "run", workers=2, tracking_uri=uri, progress_callback=records.append)

    assert marker.exists(), "rank 1 was killed once"
    assert out["iterations"] == n
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
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

    # the run directory now holds a run: starting over needs resume, resuming needs the same schedule
    with pytest.raises(InputError, match="already holds a training run"):
        train(cfg, data_root, tmp_path / "run", workers=2, resume=False)
    with pytest.raises(InputError, match="optim"):
        train(tiny_cfg(optim={"iterations": n, "lr": 0.5}), data_root, tmp_path / "run", workers=2)
