"""The stage runner: one resource policy from the cluster's nodes; the benchmark stage runs
with every thread of its node and never beside another stage; the benchmark's protocol
reports a busy process running beside it."""
import dataclasses
import subprocess
import sys
import threading
import time

import pytest

from harness.config import InputError
from harness.models import load_checkpoint
from harness.stages import Ask, policy, run_bench

FIXTURE = "tests/fixtures/vit_mask"


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module, of two CPUs whatever the machine has: two stages could
    run side by side there."""
    import ray

    from harness.raylib import ensure_ray

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ensure_ray(num_cpus=2)
        yield
        ray.shutdown()


def _cfg(repeats: int):
    _, cfg = load_checkpoint(FIXTURE)
    return dataclasses.replace(cfg, bench=dataclasses.replace(cfg.bench, warmup=1, repeats=repeats))


def _node(n: int) -> str:
    return f"{n:056x}"  # Ray's node ids: 28 bytes in hex


def test_policy_from_the_cluster_nodes():
    a, b, c = _node(1), _node(2), _node(3)
    cpu_only = policy({a: {"CPU": 4}, b: {"CPU": 8, "memory": 1e9}})
    assert (cpu_only.train, cpu_only.eval, cpu_only.bench) == (Ask(1, 0), Ask(1, 0), Ask(8, 0, b))
    assert cpu_only.train.bundle() == {"CPU": 1}
    bench = cpu_only.bench.options()
    assert (bench["num_cpus"], bench["num_gpus"]) == (8, 0)
    assert (bench["scheduling_strategy"].node_id, bench["scheduling_strategy"].soft) == (b, False)

    # the benchmark goes where a GPU is, even beside a node with more CPUs
    gpus = policy({a: {"CPU": 32}, b: {"CPU": 8, "GPU": 2}, c: {"CPU": 12, "GPU": 4}}, gpus_per_worker=1)
    assert (gpus.train, gpus.eval, gpus.bench) == (Ask(1, 1), Ask(1, 1), Ask(12, 1, c))
    assert gpus.train.bundle() == {"CPU": 1, "GPU": 1}

    # workers share a GPU; evaluation and the benchmark hold a whole one; ties go to the first node
    shared = policy({a: {"CPU": 4, "GPU": 1}, b: {"CPU": 4, "GPU": 1}}, gpus_per_worker=0.5)
    assert (shared.train, shared.eval, shared.bench) == (Ask(1, 0.5), Ask(1, 1), Ask(4, 1, a))
    assert shared.train.bundle() == {"CPU": 1, "GPU": 0.5}

    for nodes in ({a: {"CPU": 0}}, {a: {"CPU": 8}, b: {"CPU": 0, "GPU": 8}}):
        with pytest.raises(InputError, match="no node with a CPU"):
            policy(nodes)


def test_bench_stage_runs_alone_with_every_thread_of_its_node(cluster, tmp_path):
    import ray

    cfg = _cfg(repeats=10)
    node_cpus = ray.cluster_resources()["CPU"]  # one node
    assert node_cpus > 1  # with one CPU, any two tasks would run one after the other anyway

    def busy(seconds: float, marker: str) -> tuple[float, float]:
        import pathlib

        import torch  # the worker's torch starts with this task's one thread

        import harness.benchmark  # noqa: F401  what the benchmark stage loads, loaded beforehand

        start = time.time()
        pathlib.Path(marker).touch()
        while time.time() - start < seconds:
            torch.zeros(1).add_(1)
        return start, time.time()

    # evaluation-sized tasks of the same reproduction; the first ones leave idle workers with
    # the benchmark's modules loaded, so that a stage could start at once
    task = ray.remote(busy).options(**policy().eval.options())
    ray.get([task.remote(0, str(tmp_path / f"warm{i}")) for i in range(int(node_cpus))])

    # one running: the benchmark waits for it
    marker = tmp_path / "started"
    ref = task.remote(3.0, str(marker))
    while not marker.exists():
        time.sleep(0.05)
    after = run_bench(cfg, None, workers=cfg.optim.batch_size)  # training steps at batch 1: quick
    busy_start, busy_end = ray.get(ref)
    # inference, then training steps, both with every thread of the node
    assert after["train"]["protocol"]["load"]["from"] >= after["inference"]["protocol"]["load"]["to"]
    assert after["inference"]["protocol"]["load"]["from"] >= busy_end
    assert [after[m]["protocol"]["threads"] for m in ("inference", "train")] == [node_cpus] * 2
    assert after["train"]["protocol"]["batch_size"] == 1

    # the benchmark holding its node (from another driver thread): a task submitted meanwhile waits
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < node_cpus:  # Ray's view lags: past the first benchmark
        assert time.time() < deadline, "the CPUs were not given back"
        time.sleep(0.02)
    results = {}
    bench = threading.Thread(target=lambda: results.update(bench=run_bench(cfg, None, cfg.optim.batch_size)))
    bench.start()
    while ray.available_resources().get("CPU", 0) > 0 and bench.is_alive():
        assert time.time() < deadline, "the benchmark never held every CPU"
        time.sleep(0.02)
    assert bench.is_alive(), "the benchmark ended before it was seen holding every CPU"
    busy_start, _ = ray.get(task.remote(0.2, str(tmp_path / "second")))
    bench.join()
    assert busy_start >= results["bench"]["train"]["protocol"]["load"]["to"]


def test_bench_protocol_reports_a_busy_process_beside_it():
    from harness.benchmark import benchmark, load_verdict

    cfg = _cfg(repeats=20)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # running, past its interpreter's start-up
        r = benchmark(cfg, None, warmup=1, repeats=20)
    finally:
        spinner.kill()
        spinner.wait()
    load = r["protocol"]["load"]
    assert load["to"] > load["from"]
    assert load["other_cores"] > 0.3, load
    assert spinner.pid in [p["pid"] for p in load["busiest"]], load
    assert f"pid {spinner.pid}" in r["protocol"]["concurrent_load"]
    assert load["gpu_other_processes"] is None  # a CPU benchmark

    quiet = {**load, "other_cores": 0.05, "busiest": []}
    assert load_verdict(quiet) == "none detected"
    assert load_verdict({**quiet, "gpu_other_processes": 2}) == "2 other process(es) holding a context on the GPU"
