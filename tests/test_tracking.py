"""harness.tracking, the one MLflow writer, against a real SQLite store: who wrote each run,
closing the runs of a dead process, final metrics logged once, dataset inputs, the standalone
training run, and stores that are not MLflow stores."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
from mlflow import MlflowClient

from harness import contract
from harness.config import InputError, load_config
from harness.evaluate import Protocol, result_record
from harness.metrics import ConfusionMatrix
from harness.tracking import (MetricsLogger, Tracker, check_tracking_uri, end_train_run, train_run)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store created by the writer from a missing file, as a run starts."""
    root = tmp_path_factory.mktemp("store")
    uri = contract.default_tracking_uri(root)
    assert not (root / contract.STORE_FILE).exists()
    Tracker(uri, root)
    return uri, root


@pytest.fixture(scope="module")
def cfg():
    return load_config("seg_tiny_mask", profile="smoke")


def _eval_record(cfg) -> dict:
    cm = ConfusionMatrix(cfg.model.n_cls)
    cm.update(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]))
    return result_record(cm, Protocol.of(cfg, False), cfg, images=1, seconds=0.5) | {"checkpoint": "/ckpt.pth"}


def test_every_run_names_its_writer(store, cfg, tmp_path):
    uri, _ = store
    tracker = Tracker(uri, tmp_path / "run")
    parent = tracker.start_parent(["reproduce"])
    keys = {contract.TRAINING_ID: "t", contract.RUN_KEY: "r"}
    child, resumed = tracker.child_run(cfg, parent, {"device_type": "cpu"}, keys)
    runs = [parent, child, tracker.start_train(cfg), tracker.log_eval(cfg, _eval_record(cfg)),
            tracker.log_kernel_profile("check", {"device_type": "cpu"}, [], "", {})]
    for run_id in runs:
        tags = tracker.client.get_run(run_id).data.tags
        assert tags[contract.PID] == str(os.getpid()) and tags[contract.HOST] == socket.gethostname()
        assert tags[contract.RUN_DIR] == str((tmp_path / "run").resolve())
    assert not resumed
    assert tracker.client.get_run(child).data.tags[contract.PARENT_RUN] == parent
    assert tracker.child_run(cfg, parent, {}, keys) == (child, True)  # the same unfinished work continues
    assert tracker.child_run(cfg, parent, {}, {**keys, contract.RUN_KEY: "other"})[1] is False
    evaluated = tracker.client.get_run(runs[3]).data
    assert evaluated.tags[contract.KIND] == contract.KIND_EVAL and evaluated.tags[contract.STATUS] == contract.FINISHED
    assert evaluated.metrics[contract.metric(contract.SS, contract.MIOU)] == pytest.approx(
        _eval_record(cfg)["mIoU"])


def test_close_stale_kills_only_the_running_runs_of_that_run_dir(store, cfg, tmp_path):
    uri, _ = store
    mine, other = Tracker(uri, tmp_path / "mine"), Tracker(uri, tmp_path / "other")
    left_running = mine.start_train(cfg)
    finished = mine.start_train(cfg)
    mine.finish(finished)
    elsewhere = other.start_train(cfg)

    assert mine.close_stale(tmp_path / "mine") == [left_running]
    run = mine.client.get_run(left_running)
    assert run.info.status == "KILLED" and run.data.tags[contract.STATUS] == contract.KILLED
    assert mine.client.get_run(finished).info.status == "FINISHED"
    assert mine.client.get_run(elsewhere).info.status == "RUNNING"
    assert mine.close_stale(tmp_path / "mine") == []


def test_kill_records_the_last_checkpoint(store, cfg, tmp_path):
    tracker = Tracker(store[0], tmp_path)
    run_id = tracker.start_train(cfg)
    tracker.kill(run_id, str(tmp_path / "checkpoint_000002"))
    run = tracker.client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[contract.LAST_CHECKPOINT] == str(tmp_path / "checkpoint_000002")


def test_final_metrics_are_logged_once(store, cfg, tmp_path):
    tracker = Tracker(store[0], tmp_path)
    run_id = tracker.start_train(cfg)
    ss = contract.metric(contract.SS, contract.MIOU)
    tracker.log_final_metrics(run_id, {ss: 40.0})
    # the driver was killed before closing the run; its rerun logs the final metrics again
    tracker.log_final_metrics(run_id, {ss: 40.0, contract.WALL_TIME: 12.0})
    assert [m.value for m in tracker.client.get_metric_history(run_id, ss)] == [40.0]
    assert tracker.client.get_run(run_id).data.metrics[contract.WALL_TIME] == 12.0


def test_the_experiment_opens_in_mlflows_classic_view(store, tmp_path):
    from harness.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    tracker = Tracker(store[0], tmp_path)
    exp = tracker.client.get_experiment(tracker.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_an_unwritable_store_is_refused_at_once(tmp_path):
    with pytest.raises(InputError, match="is not a file"):
        check_tracking_uri(f"sqlite:///{tmp_path}")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot create its directory"):
        check_tracking_uri(f"sqlite:///{blocker}/mlflow.db")


def test_log_dataset_tags_the_fingerprints_and_logs_dataset_inputs(store, cfg, tmp_path):
    tracker = Tracker(store[0], tmp_path)
    run_id = tracker.start_train(cfg)
    fingerprints = {"training": {"fingerprint": "a" * 64, "images": 3},
                    "validation": {"fingerprint": "b" * 64, "images": 2}}
    for _ in range(2):  # a resumed run logs its dataset again: still one input per split
        tracker.log_dataset(run_id, tmp_path / "ade", fingerprints, "training")
    run = tracker.client.get_run(run_id)
    assert run.data.tags[contract.DATA_ROOT] == str((tmp_path / "ade").resolve())
    assert run.data.tags[contract.TRAIN_FINGERPRINT] == "a" * 64
    assert run.data.tags[contract.VAL_FINGERPRINT] == "b" * 64
    assert (run.data.tags[contract.TRAIN_IMAGES], run.data.tags[contract.VAL_IMAGES]) == ("3", "2")
    assert run.data.tags[contract.VAL_DATA] == contract.VAL_OTHER  # no such directory: not ADE20K val
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["ADE20K/training", "ADE20K/validation"]
    assert inputs["ADE20K/training"].dataset.digest == ("a" * 64)[:36]
    assert {t.key: t.value for t in inputs["ADE20K/validation"].tags} == {"mlflow.data.context": "training"}


def test_metrics_logger(store, cfg, tmp_path):
    MetricsLogger(None).log({contract.TRAIN_LOSS: 1.0}, step=1)  # no tracking: nothing to write to
    tracker = Tracker(store[0], tmp_path)
    run_id = tracker.start_train(cfg)
    logger = MetricsLogger({"uri": store[0], "run_id": run_id})
    for step in (5, 10):
        logger.log({contract.TRAIN_LOSS: 10.0 / step}, step)
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, contract.TRAIN_LOSS)] == [
        (5, 2.0), (10, 1.0)]


def test_train_run_is_one_per_run_directory(store, cfg, tmp_path):
    uri, _ = store
    data = (tmp_path / "data", {"fingerprint": "f" * 16, "images": 4}, "t" * 16)
    assert train_run(cfg, tmp_path, None, None, *data) == (None, False)
    assert train_run(cfg, tmp_path, uri, "given", *data) == ({"uri": uri, "run_id": "given"}, False)
    tracking, owned = train_run(cfg, tmp_path, uri, None, *data)
    end_train_run(tracking, None, killed=True)
    assert owned and train_run(cfg, tmp_path, uri, None, *data) == (tracking, True)  # resumed: the same run
    run = MlflowClient(uri).get_run(tracking["run_id"])
    assert (run.info.status, run.data.tags[contract.STATUS]) == ("RUNNING", contract.RUNNING)  # reopened
    assert run.data.tags[contract.STAGE] == contract.STAGE_TRAIN
    assert run.data.params["optim.iterations"] == str(cfg.optim.iterations)
    assert run.data.tags[contract.TRAINING_ID] == "t" * 16
    assert run.data.tags[contract.DATA_ROOT] == str(tmp_path / "data")
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["ADE20K/training"]
    end_train_run(tracking, "bad dataset file: x.png")
    run = MlflowClient(uri).get_run(tracking["run_id"])
    assert run.info.status == "FAILED" and run.data.tags[contract.ERROR] == "bad dataset file: x.png"


@pytest.mark.parametrize("damage", ["random bytes", "empty file", "not an MLflow store"])
def test_the_writer_refuses_a_file_that_is_not_a_store(tmp_path, damage):
    import sqlite3

    db = tmp_path / contract.STORE_FILE
    if damage == "random bytes":
        db.write_bytes(os.urandom(4096))
    elif damage == "empty file":
        db.touch()
    else:
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE notes (text)")
    before = db.read_bytes()
    uri = contract.default_tracking_uri(tmp_path)
    for write in (check_tracking_uri, Tracker):
        with pytest.raises(InputError, match="not a readable MLflow store") as info:
            write(uri)
        assert str(db) in str(info.value)
    assert db.read_bytes() == before


def test_concurrent_runs_log_the_same_dataset(store, cfg, tmp_path):
    """reproduce's configurations record the same data at the same moment, each from its thread."""
    import threading

    uri, _ = store
    tracker = Tracker(uri, tmp_path)
    parent = tracker.start_parent(["reproduce"])
    runs = [tracker.child_run(cfg, parent, {}, {contract.TRAINING_ID: str(i), contract.RUN_KEY: f"k{i}"})[0]
            for i in range(8)]
    start, errors = threading.Barrier(len(runs)), []

    def log(run_id):
        start.wait()
        try:
            tracker.log_dataset(run_id, tmp_path / "data", {"training": "a" * 16, "validation": "b" * 16}, "training")
        except Exception as e:  # whatever escaped fails the test below
            errors.append(e)

    threads = [threading.Thread(target=log, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for run_id in runs:
        names = sorted(d.dataset.name for d in tracker.client.get_run(run_id).inputs.dataset_inputs)
        assert names == ["ADE20K/training", "ADE20K/validation"]
