"""`segrepro reproduce` end to end on a generated dataset: killed and restarted, skipped when
finished, bad input refused up front, and on a two-node Ray cluster with an MLflow server."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.contract import BENCH_TRAIN, BENCH_TRAIN_FIGURES, BENCH_TRAIN_PREFIX
from harness.data.synth import synthesize

TINY_PROFILE = """description: a few iterations of a two-layer model, for tests
overrides:
  model: {init: scratch}
  data: {crop_size: 64, train_scale: [256, 64], test_scale: 64, num_workers: 0}
  optim: {iterations: ITERS, batch_size: 2, lr: 0.01, min_lr: 0.0001, eval_interval: 1000,
          checkpoint_interval: CKPT, log_interval: LOG}
  eval: {window: 64, stride: 48, batch_size: 4, scales: [0.75, 1.0]}
  bench: {warmup: 1, repeats: 2}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_experiments):
    """A copy of experiments/ with a two-layer zoo row and a tiny profile, and a dataset."""
    root = tmp_path_factory.mktemp("reproduce")
    exp = tiny_experiments(root / "experiments", {
        "tiny": TINY_PROFILE.replace("ITERS", "12").replace("CKPT", "4").replace("LOG", "2"),
        # long enough after its first checkpoint that a kill lands mid-training
        "tiny_long": TINY_PROFILE.replace("ITERS", "120").replace("CKPT", "30").replace("LOG", "10")})
    synthesize(root / "data", train=8, val=2, size=(64, 80), classes=4, seed=0)
    synthesize(root / "other", train=8, val=2, size=(64, 80), classes=4, seed=1)
    environ = {**os.environ, "SEGREPRO_EXPERIMENTS": str(exp), "RAY_AUTH_MODE": "disabled"}
    return {"root": root, "data": root / "data", "other": root / "other", "exp": exp, "env": environ}


def _segrepro(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          env=env["env"], **kw)


def _runs(uri):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("segrepro")
    return client, client.search_runs([exp.experiment_id], filter_string="tags.`segrepro.kind` = 'config'")


def _parents(uri):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("segrepro")
    return client.search_runs([exp.experiment_id], filter_string="tags.`segrepro.kind` = 'reproduce'",
                              order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def resumed(env):
    """A reproduce killed outright (SIGKILL) after its first checkpoint, then run again to the
    end: the run directory, the arguments, the MLflow run before the rerun and the rerun."""
    run_dir = env["root"] / "killed"
    args = ["reproduce", "--configs", "tiny_test", "--profile", "tiny_long", "--data-root", str(env["data"]),
            "--run-dir", str(run_dir)]
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env=env["env"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        # a checkpoint counts once Ray Train has recorded it in its snapshot
        while not any("checkpoint_" in p.read_text() for p in run_dir.glob("configs/*/train/ray/*/checkpoint_manager_snapshot.json")):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint before the kill"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    client, (child,) = _runs(uri)
    return {"run_dir": run_dir, "args": args, "uri": uri, "child": child, "rerun": _segrepro(env, *args, "--json")}


def test_killed_reproduce_resumes_and_a_finished_one_is_skipped(env, resumed):
    run_dir, args, uri, child, res = (resumed[k] for k in ("run_dir", "args", "uri", "child", "rerun"))
    assert child.data.tags["segrepro.status"] == "running"
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert [o["status"] for o in out["outcomes"]] == ["finished"]
    # the dead process's parent run was closed as KILLED when the rerun took the run directory
    first, second = _parents(uri)
    assert (first.info.status, first.data.tags["segrepro.status"]) == ("KILLED", "killed")
    assert second.info.status == "FINISHED"
    client, (child2,) = _runs(uri)
    assert child2.info.run_id == child.info.run_id  # the interrupted run continued, curves and all
    assert (child2.data.tags["segrepro.val_data"], child2.data.tags["segrepro.val_images"]) == ("generated", "2")
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
    assert max(steps) == 120
    # resumed from a checkpoint, not from zero: the first logged iteration appears once
    assert steps.count(min(steps)) == 1
    final = ("ss/mIoU", "msflip/mIoU", "bench/images_per_s", "bench/gflops", "wall_time_s", "gpu_hours",
             *(f"{BENCH_TRAIN}/{figure}" for figure in BENCH_TRAIN_FIGURES))
    for key in final:
        assert len(client.get_metric_history(child.info.run_id, key)) == 1, key
    # the training benchmark at the profile's crop and per-worker batch (one worker: the global batch)
    m, params = child2.data.metrics, child2.data.params
    assert m[f"{BENCH_TRAIN}/images_per_s"] == pytest.approx(2 / (m[f"{BENCH_TRAIN}/step_median_ms"] / 1e3))
    assert m[f"{BENCH_TRAIN}/step_p90_ms"] >= m[f"{BENCH_TRAIN}/step_median_ms"] > 0
    assert m[f"{BENCH_TRAIN}/peak_memory_mb"] > 0
    protocol = {k[len(BENCH_TRAIN_PREFIX):]: v for k, v in params.items() if k.startswith(BENCH_TRAIN_PREFIX)}
    assert "RSS" in protocol.pop("peak_memory_kind")
    assert protocol == {"crop": "64", "batch_size": "2", "precision": "fp32", "device": "cpu",
                        "threads": params["bench.threads"]}
    # wall time counts both attempts of training (the driver's ledger) and the evaluations
    (work,) = run_dir.glob("configs/tiny_test-*")
    train = json.loads((work / "train" / "train_result.json").read_text())
    evals = sum(json.loads((work / f"{m}_metrics.json").read_text())["seconds"] for m in ("ss", "msflip"))
    assert train["attempts"] == 2
    assert child2.data.metrics["wall_time_s"] == pytest.approx(train["wall_time_s"] + evals)
    assert (run_dir / "report" / "report.html").is_file()

    # a description changes no weight: the finished run is found again and skipped
    zoo = env["exp"] / "zoo" / "tiny_test.yaml"
    original = zoo.read_text()
    zoo.write_text(original.replace('description: "', 'description: "typo fixed: ', 1))
    try:
        start = time.time()
        again = _segrepro(env, *args, "--json")
    finally:
        zoo.write_text(original)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [o["status"] for o in json.loads(again.stdout)["outcomes"]] == ["skipped"]
    assert time.time() - start < 60


def test_a_run_is_listed_and_its_run_dir_evaluates_and_benchmarks_as_reproduce_did(env, resumed, segrepro,
                                                                                   monkeypatch, tmp_path):
    monkeypatch.setenv("SEGREPRO_EXPERIMENTS", env["env"]["SEGREPRO_EXPERIMENTS"])
    assert resumed["rerun"].returncode == 0, resumed["rerun"].stderr[-3000:]
    (work,) = resumed["run_dir"].glob("configs/tiny_test-*")
    ss = json.loads((work / "ss_metrics.json").read_text())
    bench = json.loads((work / "bench.json").read_text())
    checkpoint = json.loads((work / "train" / "train_result.json").read_text())["checkpoint"]
    files = {"ss": str(work / "ss_metrics.json"), "msflip": str(work / "msflip_metrics.json"),
             "bench": str(work / "bench.json"), "log": str(work / "log.txt")}

    # reproduce's outcome names the work, the checkpoint and the results
    (outcome,) = json.loads(resumed["rerun"].stdout)["outcomes"]
    assert (outcome["work_dir"], outcome["checkpoint"], outcome["files"]) == (str(work), checkpoint, files)
    # each evaluation and the benchmark reported its count (the board's lines off a terminal)
    board = resumed["rerun"].stderr
    assert f"eval ss {ss['images']}/{ss['images']} img" in board, board[-3000:]
    assert f"eval ms+flip {ss['images']}/{ss['images']} img" in board, board[-3000:]
    assert re.search(r"bench (\d+)/\1 runs", board), board[-3000:]

    # segrepro runs lists it from the work directories, with or without the MLflow store
    copy = tmp_path / "no-store"
    shutil.copytree(work, copy / "configs" / work.name)
    for run_dir in (resumed["run_dir"], copy):
        res = segrepro("runs", "--run-dir", run_dir, "--json")
        assert res.returncode == 0, res.stderr[-2000:]
        (row,) = json.loads(res.stdout)["configs"]
        assert (row["config"], row["status"], row["stage"], row["checkpoint"]) == ("tiny_test", "finished", "done",
                                                                                     checkpoint)
        assert (row["ss_mIoU"], row["images_per_s"], row["profile"]) == (
            ss["mIoU"], bench["inference"]["images_per_s"], "tiny_long")
    res = segrepro("runs", "--run-dir", resumed["run_dir"])
    assert checkpoint in res.stdout and "finished" in res.stdout, res.stdout

    # the run directory as --checkpoint: its config, profile, protocol and data, exactly
    res = segrepro("eval", "--checkpoint", work, "--out", tmp_path / "eval", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads(res.stdout)
    assert (record["mIoU"], record["protocol"], record["images"]) == (ss["mIoU"], ss["protocol"], ss["images"])
    res = segrepro("bench", "--checkpoint", work, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    proto = json.loads(res.stdout)["protocol"]
    for key in ("batch_size", "precision", "image_size", "warmup", "repeats", "window", "stride"):
        assert proto[key] == bench["inference"]["protocol"][key], key
    # ... unless told otherwise: another profile's protocol
    from harness.config import load_config

    res = segrepro("eval", "--checkpoint", work, "--profile", "full", "--limit", "1", "--out", tmp_path / "full",
                   "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["protocol"]["window"] == load_config("tiny_test", profile="full").eval.window


def _wait_for(predicate, proc, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.3)


def test_a_live_run_is_never_shared_and_ctrl_c_stops_it(env):
    """A second reproduce and a --force on a live run directory are refused at once; SIGINT ends
    the live one within seconds with its runs KILLED; a rerun on other data trains apart."""
    run_dir = env["root"] / "live"
    args = ["reproduce", "--configs", "tiny_test", "--profile", "tiny_long", "--data-root", str(env["data"]),
            "--run-dir", str(run_dir)]
    log = open(env["root"] / "live.stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env=env["env"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_for(lambda: "train 10/120" in Path(log.name).read_text(), proc, 240, "training progress")
        for extra in ([], ["--force"]):
            start = time.time()
            res = _segrepro(env, *args, *extra)
            assert time.time() - start < 10
            assert res.returncode == 2, res.stderr[-2000:]
            (line,) = [l for l in res.stderr.splitlines() if l.startswith("segrepro: error")]
            assert f"PID {proc.pid} on {socket.gethostname()}" in line, line
        (work,) = run_dir.glob("configs/tiny_test-*")
        assert (work / "train").is_dir()  # --force moved nothing of the live run

        # what a terminal's Ctrl-C does: SIGINT to the whole foreground process group
        start = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=15)
        assert time.time() - start < 15
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.seek(0)
    stderr = log.read()
    assert proc.returncode == 130, stderr[-3000:]
    assert "rerun `segrepro reproduce" in stderr.splitlines()[-1], stderr[-2000:]
    # nothing of the run outlives it: Ray's processes of that session are gone
    time.sleep(2)
    left = [pid for pid in _pids() if _session(pid) == proc.pid]
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    client, (child,) = _runs(uri)
    assert (child.info.status, child.data.tags["segrepro.status"]) == ("KILLED", "killed")
    (parent,) = _parents(uri)
    assert parent.info.status == "KILLED"

    # other data under the same run directory: a run of its own, from iteration 0
    res = _segrepro(env, "reproduce", "--configs", "tiny_test", "--profile", "tiny", "--data-root", str(env["other"]),
                    "--run-dir", str(run_dir), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    (outcome,) = json.loads(res.stdout)["outcomes"]
    assert outcome["status"] == "finished" and outcome["run_id"] != child.info.run_id
    new = client.get_run(outcome["run_id"])
    assert new.data.tags["segrepro.data_root"] == str(env["other"].resolve())
    assert new.data.tags["segrepro.training_id"] != child.data.tags["segrepro.training_id"]
    assert min(m.step for m in client.get_metric_history(new.info.run_id, "train/loss")) == 2
    assert len(new.inputs.dataset_inputs) >= 1  # the data shows in MLflow's UI as the run's dataset
    assert client.get_run(child.info.run_id).info.status == "KILLED"  # the first run's work is untouched
    assert len(list(run_dir.glob("configs/tiny_test-*"))) == 2


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_bad_input_is_refused_before_any_work(env, tmp_path, segrepro, monkeypatch):
    # in this process: every refusal comes before Ray would start
    monkeypatch.setenv("SEGREPRO_EXPERIMENTS", env["env"]["SEGREPRO_EXPERIMENTS"])
    base = ["reproduce", "--profile", "tiny", "--run-dir", str(tmp_path / "run")]
    cases = [
        (["--configs", "seg_nope", "--data-root", str(env["data"])], "unknown configuration 'seg_nope'"),
        (["--configs", "tiny_test", "--data-root", str(tmp_path / "missing")], "--data-root"),
        (["--configs", "tiny_test", "--data-root", str(env["data"]), "--address", "127.0.0.1:9"], "Ray address"),
        (["--configs", "tiny_test", "--data-root", str(env["data"]), "--tracking-uri", "http://127.0.0.1:9"],
         "tracking URI"),
    ]
    for extra, message in cases:
        res = segrepro(*base, *extra)
        assert res.returncode == 2, (extra, res.stderr[-2000:])
        lines = [l for l in res.stderr.splitlines() if l.startswith("segrepro: error")]
        assert len(lines) == 1 and message in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "run" / "configs").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, seconds: float) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            assert time.time() < deadline, f"{url} did not answer"
            time.sleep(0.5)


def _wait_nodes(ray_bin: str, port: int, env: dict, count: int, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        status = subprocess.run([ray_bin, "status", "--address", f"127.0.0.1:{port}"], env=env,
                                capture_output=True, text=True).stdout
        if status.count("node_") >= count:
            return
        assert time.time() < deadline, f"fewer than {count} Ray nodes after {seconds} s:\n{status}"
        time.sleep(1)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to a process group this test started, SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def test_two_node_ray_cluster_and_mlflow_server(env, tmp_path):
    ray_port, mlflow_port = _free_port(), _free_port()
    e = env["env"]
    server = subprocess.Popen([Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1",
                               "--port", str(mlflow_port), "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ray_bin = str(Path(sys.executable).parent / "ray")
    # both nodes in the foreground (--block), each in its own process group, so that the test
    # stops exactly the nodes it started (`ray stop` would stop every Ray on the machine)
    nodes = [subprocess.Popen([ray_bin, "start", "--block", *args, "--num-cpus", "1"], env=e, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for args in (["--head", "--port", str(ray_port), "--include-dashboard=false"],
                          ["--address", f"127.0.0.1:{ray_port}"])]
    try:
        _wait_nodes(ray_bin, ray_port, e, 2, 120)
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", 60)
        uri = f"http://127.0.0.1:{mlflow_port}"
        res = _segrepro(env, "reproduce", "--configs", "tiny_test", "--profile", "tiny", "--data-root",
                        str(env["data"]), "--run-dir", str(tmp_path / "run"), "--address", f"127.0.0.1:{ray_port}",
                        "--tracking-uri", uri, "--workers", "2", "--json")
        assert res.returncode == 0, res.stderr[-3000:]
        status = subprocess.run([ray_bin, "status", "--address", f"127.0.0.1:{ray_port}"], env=e,
                                capture_output=True, text=True).stdout
        assert status.count("node_") >= 2, status
        client, (child,) = _runs(uri)
        assert child.data.tags["segrepro.status"] == "finished"
        assert {"ss/mIoU", "msflip/mIoU", "bench/images_per_s"} <= set(child.data.metrics)
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) >= 6
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "ss_per_class.csv", "msflip_per_class.csv", "log.txt"} <= artifacts
        assert not (tmp_path / "run" / "mlflow.db").exists()
    finally:
        for proc in [*reversed(nodes), server]:
            _stop_group(proc)
