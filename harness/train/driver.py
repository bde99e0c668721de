"""The Ray driver of one training run: checks its inputs, resolves its weights, runs the loop
on Ray Train workers (DDP: NCCL on GPUs, gloo on CPU) and records the outcome."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from harness import weights
from harness.atomic import write_json
from harness.config import Config, InputError
from harness.data import ADE20K, DataError
from harness.tracking import end_train_run, train_run
from harness.train.checkpoint import CONFIG_FILE, MODEL_FILE, check_resumable
from harness.train.loop import Progress, format_progress, ray_worker


RESULT_FILE = "train_result.json"
RAY_RUN_NAME = "train"
MAX_FAILURES = 3


def _check_inputs(cfg: Config, data_root, workers: int, gpus_per_worker: float) -> None:
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if gpus_per_worker < 0:
        raise InputError(f"--gpus-per-worker must not be negative, got {gpus_per_worker}")
    if cfg.optim.batch_size % workers:
        raise InputError(f"{cfg.name}: global batch {cfg.optim.batch_size} is not divisible by {workers} workers")
    if cfg.optim.amp != "fp32" and gpus_per_worker == 0:
        # a CPU run would train in fp32 and record another precision beside its figures
        raise InputError(f"{cfg.name}: --amp {cfg.optim.amp} needs CUDA workers (--gpus-per-worker > 0); "
                         f"CPU workers train in fp32")
    for split in ("training", "validation"):
        try:
            ADE20K(data_root, split)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--data-root {data_root}: {e}") from None


def _drain(queue, stop: threading.Event, callback: Progress) -> None:
    from ray.util.queue import Empty

    while True:
        try:
            callback(queue.get(timeout=0.5))
        except Empty:
            if stop.is_set():
                return


def _print_progress(record: dict) -> None:
    print(format_progress(record), file=sys.stderr, flush=True)


def train(cfg: Config, data_root: str | os.PathLike, run_dir: str | os.PathLike, workers: int = 1,
          gpus_per_worker: float = 0, address: str | None = None, resume: bool = True,
          backbone_weights: str | os.PathLike | None = None, backbone_dir: str | os.PathLike | None = None,
          from_scratch: bool = False, tracking_uri: str | None = None,
          mlflow_run_id: str | None = None, progress_callback: Progress | None = None,
          max_failures: int = MAX_FAILURES) -> dict:
    """Train ``cfg`` with Ray Train on ``workers`` DDP workers; return the outcome.

    ``run_dir`` holds the Ray storage (checkpoints), the MLflow run id and ``train_result.json``.
    ``resume`` continues the run already in ``run_dir`` from its latest checkpoint; without it
    an existing run is an error. The encoder starts from the config's ImageNet checkpoint
    (``backbone_weights``, else the Hugging Face cache, else ``backbone_dir``: harness/weights.py),
    or from random init with ``from_scratch``; the choice and the file's SHA-256 become part of
    the resolved config. A worker that dies is restarted from the last checkpoint up to
    ``max_failures`` times. Progress records (iteration, total, loss, lr, eta_s, and val/* at
    evaluations) go to ``progress_callback``, or are printed to stderr.

    Result: ``checkpoint`` (final checkpoint.pth), ``iterations``, ``metrics`` (last train
    record), ``val`` (last validation), ``wall_time_s``, ``run_dir``, ``config``,
    ``config_hash``, ``mlflow_run_id``.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from harness.raylib import ensure_ray
    from harness.stages import policy

    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    _check_inputs(cfg, data_root, workers, gpus_per_worker)
    cfg, found = weights.resolve(cfg, backbone_dir, backbone_weights, from_scratch)
    storage = run_dir / "ray"
    if (storage / RAY_RUN_NAME).exists():
        if not resume:
            raise InputError(f"--run-dir {run_dir} already holds a training run; pass --resume to continue it "
                             f"or choose another --run-dir")
        saved = sorted((storage / RAY_RUN_NAME).glob(f"checkpoint_*/{CONFIG_FILE}"))
        if saved:  # Ray names checkpoint directories by time
            check_resumable(json.loads(saved[-1].read_text()), cfg, saved[-1].parent)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracking, owns_run = train_run(cfg, run_dir, tracking_uri, mlflow_run_id)

    ensure_ray(address)
    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(queue, stop, progress_callback or _print_progress), daemon=True)
    drainer.start()
    use_gpu = gpus_per_worker > 0
    resources = policy(gpus_per_worker=gpus_per_worker).train.bundle()
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"cfg": cfg, "data_root": str(Path(data_root).resolve()), "queue": queue,
                           "backbone_weights": str(found.path) if found else None,
                           "tracking": tracking},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RAY_RUN_NAME, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # the test hooks and the experiments directory reach workers started after ray.init
            worker_runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("SEGREPRO_")}}),
    )
    error = "training did not finish"
    try:
        result = trainer.fit()
        data_error = (result.return_value or {}).get("data_error")
        error = data_error and f"bad dataset file: {data_error}"
    finally:
        stop.set()
        drainer.join()
        if owns_run:
            end_train_run(tracking, error)
        queue.shutdown(force=True)  # drained: the thread exits only on an empty queue
    if data_error:
        raise DataError(f"{cfg.name}: training stopped on a bad dataset file: {data_error}")
    out = dict(result.return_value or {})
    out.update(checkpoint=str(Path(result.checkpoint.path) / MODEL_FILE), wall_time_s=time.perf_counter() - started,
               run_dir=str(run_dir), config=cfg.name, recipe=cfg.recipe, profile=cfg.profile,
               config_hash=cfg.config_hash(), mlflow_run_id=tracking["run_id"] if tracking else None,
               init=weights.describe(cfg), init_sha256=cfg.model.init_sha256, amp=cfg.optim.amp,
               backbone_file=str(found.path) if found else None)
    write_json(run_dir / RESULT_FILE, out)
    return out
