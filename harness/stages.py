"""The Ray stage runner and its one resource policy.

Every stage asks Ray for what ``policy`` decides from the cluster's nodes:

- a training worker (Ray Train; also the preflight's measurement): 1 CPU + ``--gpus-per-worker``
  GPU;
- an evaluation (a whole split, or one shard of ``eval --workers``): 1 CPU, + 1 GPU where the
  cluster has GPUs;
- the benchmark (inference, then training steps): every CPU of one node (the one with the most
  CPUs among those with a GPU, where the cluster has GPUs), + 1 GPU there.

A stage runs as many torch threads as the CPUs it holds. So the benchmark measures with all of
its node's threads, as ``segrepro bench`` does, and, holding every CPU there, it measures
alone: no training worker, evaluation or measurement (each holds at least one CPU) runs on its
node meanwhile, and none starts there until it ends. Ray enforces this across the driver
threads of one ``reproduce`` and across nodes and drivers, on any cluster, with no resource the
nodes must have been started with; the benchmark waits until its node is free.

The stage bodies import evaluation and the benchmark when they run: the training driver and
``evaluate`` use the policy without importing what sits above them. Given a progress file, an
evaluation reports every image and the benchmark every run to it (``harness.progress``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray

from harness.config import Config, InputError
from harness.progress import ProgressFile

if TYPE_CHECKING:
    from harness.data.ade20k import ADE20K
    from harness.evaluate import Protocol
    from harness.metrics import ConfusionMatrix


@dataclass(frozen=True)
class Ask:
    """What one task or training worker holds; ``node`` pins it to that node."""

    cpus: float
    gpus: float = 0
    node: str | None = None

    def options(self) -> dict:
        """Keyword arguments of ``.options()`` for a task."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        out = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.node:
            out["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.node, soft=False)
        return out

    def bundle(self) -> dict:
        """Ray's resource names: a Ray Train worker's ``resources_per_worker``."""
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}

    def describe(self) -> str:
        return f"{self.cpus:g} CPU + {self.gpus:g} GPU" + (f" on node {self.node[:12]}" if self.node else "")


@dataclass(frozen=True)
class Policy:
    train: Ask  # one training worker
    eval: Ask  # one evaluation: a whole split, or one shard
    bench: Ask


def alive_nodes() -> dict[str, dict]:
    """Node id -> resources of every alive node of the connected cluster."""
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def policy(nodes: dict[str, dict] | None = None, gpus_per_worker: float = 0) -> Policy:
    """What each stage asks for on a cluster of ``nodes`` (node id -> resources; the connected
    cluster's alive nodes by default)."""
    nodes = alive_nodes() if nodes is None else nodes
    has_gpus = any(r.get("GPU", 0) > 0 for r in nodes.values())
    hosts = {n: r for n, r in nodes.items() if r.get("CPU", 0) >= 1 and (r.get("GPU", 0) >= 1 or not has_gpus)}
    if not hosts:
        raise InputError("the Ray cluster has no node with a CPU" + (" and a whole GPU" if has_gpus else "")
                         + ": evaluation and the benchmark need one")
    # the most CPUs: the most threads; ties go to the first node listed
    node = max(hosts, key=lambda n: hosts[n]["CPU"])
    gpu = 1 if has_gpus else 0
    return Policy(train=Ask(1, gpus_per_worker), eval=Ask(1, gpu), bench=Ask(hosts[node]["CPU"], gpu, node))


def _threads_of_held_cpus() -> None:
    """Ray sets OMP_NUM_THREADS per task, but torch reads it once per process and Ray reuses
    worker processes: every stage sets torch's threads to the CPUs it holds."""
    import torch

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))


def _reporter(progress: tuple[str, str] | None, unit: str) -> ProgressFile | None:
    return ProgressFile(progress[0], progress[1], unit) if progress else None


@ray.remote
def _eval(checkpoint: str, cfg: Config, data_root: str, ms_flip: bool, out_dir: str,
          progress: tuple[str, str] | None) -> dict:
    from harness.evaluate import run_eval

    _threads_of_held_cpus()
    return run_eval(checkpoint, cfg, data_root, ms_flip, None, 1, out_dir, progress=False,
                    on_image=_reporter(progress, "img"))


@ray.remote
def _eval_shard(checkpoint: str, cfg: Config, protocol: Protocol, dataset: ADE20K,
                source_config: str | None) -> ConfusionMatrix:
    from harness.evaluate import _evaluate_shard

    _threads_of_held_cpus()
    return _evaluate_shard(checkpoint, cfg, protocol, dataset, False, source_config)


@ray.remote
def _bench(cfg: Config, checkpoint: str | None, workers: int, progress: tuple[str, str] | None) -> dict:
    from harness.benchmark import benchmark, benchmark_train

    _threads_of_held_cpus()
    b = cfg.bench
    report = _reporter(progress, "runs")
    train_runs, inference_runs = b.warmup + b.repeats, []

    def on_inference(done: int, total: int) -> None:  # one count over both halves
        inference_runs[:] = [total]
        report(done, total + train_runs)

    def on_train(done: int, total: int) -> None:
        report(sum(inference_runs) + done, sum(inference_runs) + total)

    return {"inference": benchmark(cfg, checkpoint, b.batch_size, None, b.precision, None, b.warmup, b.repeats,
                                   on_run=on_inference if report else None),
            "train": benchmark_train(cfg, None, workers, b.warmup, b.repeats, on_run=on_train if report else None)}


def run_eval(checkpoint: str, cfg: Config, data_root: str, ms_flip: bool, out_dir: str,
             progress: tuple[str, str] | None = None) -> dict:
    """The validation split of ``data_root`` evaluated (ss, or ms+flip) with ``cfg``'s protocol in
    one task; the record (``evaluate.run_eval``'s) is also written to ``out_dir``. ``progress``:
    (progress file, the stage's token) to report every image to."""
    return ray.get(_eval.options(**policy().eval.options()).remote(checkpoint, cfg, data_root, ms_flip, out_dir,
                                                                   progress))


def run_eval_shards(checkpoint: str, cfg: Config, protocol: Protocol, shards: list[ADE20K],
                    source_config: str | None) -> list[ConfusionMatrix]:
    """One confusion matrix per dataset shard, each from a task of its own."""
    ask = policy().eval.options()
    return ray.get([_eval_shard.options(**ask).remote(checkpoint, cfg, protocol, shard, source_config)
                    for shard in shards])


def run_bench(cfg: Config, checkpoint: str | None, workers: int = 1,
              progress: tuple[str, str] | None = None) -> dict:
    """``cfg``'s benchmark (its ``bench`` section's warm-up and repeats) alone on its node with all
    of its threads: ``{"inference": benchmark.benchmark's result, "train": benchmark.benchmark_train's
    at the per-worker batch of ``workers`` training workers}``. ``progress``: (progress file,
    token) to report every run to."""
    return ray.get(_bench.options(**policy().bench.options()).remote(cfg, checkpoint, workers, progress))
