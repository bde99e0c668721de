"""The Ray driver of one training run: checks its inputs, resolves its weights, holds the run
directory, picks the checkpoint to resume from, runs the loop on Ray Train workers (DDP: NCCL
on GPUs, gloo on CPU) and records the outcome.

The run directory:
- ``ray/attempt-NNN/checkpoint_*``: the checkpoints, one Ray run per attempt (each ``train``
  call). The driver, not Ray's record of its runs, decides where to resume: the usable
  checkpoint of the highest iteration, whichever attempt wrote it and whether or not Ray
  recorded it before the attempt died;
- ``train_attempts.json``: every attempt with its wall time, rewritten at every progress
  record, so an attempt killed without warning still counts up to its last record;
- ``train_result.json``: the outcome of the attempt that finished;
- ``mlflow_run_id``, and the lock file (harness/lock.py).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from harness import interrupt, weights
from harness.atomic import write_json
from harness.config import Config, InputError
from harness.data.ade20k import ADE20K, DataError
from harness.data.fingerprint import split_fingerprint
from harness.identity import training_id, training_settings
from harness.lock import RunLock
from harness.tracking import end_train_run, train_run
from harness.train.checkpoint import MODEL_FILE, Saved, Unusable, check_resumable, newest, verify
from harness.train.loop import PLACEMENT_GROUP, Progress, format_progress, ray_worker
from harness.train.session import Hook


RESULT_FILE = "train_result.json"
LEDGER_FILE = "train_attempts.json"
RAY_DIR = "ray"
ATTEMPT_PREFIX = "attempt-"
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


def _data_error_message(cfg: Config, data_root: Path, error: str) -> str:
    """The bad file first and relative to the dataset (a report's status cell keeps the start of a
    message), then why, then how to find every other bad file."""
    from harness.data.ade20k import dataset_dir

    path, _, reason = error.partition(": ")  # a DataError's message starts with its path
    base = dataset_dir(data_root)
    try:
        shown = str(Path(path).relative_to(base))
    except ValueError:
        shown, base = path, None
    where = f"; in {base}" if base else ""
    return (f"{cfg.name}: bad dataset file {shown}: {reason}{where}; `segrepro data check --root {data_root}` "
            f"lists every unreadable file: replace or remove them")


def _drain(queue, stop: threading.Event, callback: Progress) -> None:
    from ray.util.queue import Empty

    while True:
        try:
            callback(queue.get(timeout=0.5))
        except Empty:
            if stop.is_set():
                return
        except Exception:
            if interrupt.requested():  # Ctrl-C stopped Ray, the queue's actor with it
                return
            raise


def _trainer_class():
    """Ray Train's TorchTrainer without its PlacementGroupCleaner (ray 2.5x, pinned).

    The cleaner watches the controller through the state API, which needs the dashboard that
    segrepro's embedded Ray does not run: it cannot see a controller die, and its shutdown waits
    out a 10 s state-API timeout, 12 s at the end of every fit. ``release_placement_groups``
    does its job here, and Ray removes a dead driver's groups with its job."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def release_placement_groups(ids: Sequence[str]) -> None:
    """Remove the workers' placement groups that outlived their fit.

    Ray Train removes them when a run ends, except where its controller itself failed (a worker
    killed by Ray's memory monitor, say); its safety net, the PlacementGroupCleaner, asks the
    state API, which needs the dashboard that segrepro's embedded Ray does not run. A group left
    behind holds its CPUs for good, and the benchmark, which waits for a free node, waits forever."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    if not ray.is_initialized():  # Ctrl-C stopped Ray, and its groups with it
        return
    for hex_id in ids:
        group = PlacementGroup(ray.PlacementGroupID.from_hex(hex_id))
        if placement_group_table(group).get("state") not in (None, "REMOVED"):
            remove_placement_group(group)


def _print_progress(record: dict) -> None:
    print(format_progress(record), file=sys.stderr, flush=True)


class _Ledger:
    """``train_attempts.json``: the attempts at one run directory's training, this one last."""

    def __init__(self, path: Path, ray_run: str):
        self.path = path
        self.attempts = []
        if path.is_file():
            try:
                self.attempts = json.loads(path.read_text())["attempts"]
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{path}: not a training ledger ({type(e).__name__}: {e}); restore or remove "
                                 f"it (the run then counts its wall time from this attempt)") from None
        self.started = time.monotonic()
        self.attempts.append({"ray_run": ray_run, "pid": os.getpid(), "host": socket.gethostname(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": 0.0})
        self.beat()

    def beat(self) -> None:
        """This attempt's wall time so far, written down."""
        self.attempts[-1]["wall_s"] = time.monotonic() - self.started
        write_json(self.path, {"attempts": self.attempts})

    def wall_s(self) -> float:
        return sum(a["wall_s"] for a in self.attempts)


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint directory of every attempt in ``run_dir``, usable or not."""
    return sorted(p for p in (Path(run_dir) / RAY_DIR).glob(f"{ATTEMPT_PREFIX}*/checkpoint_*") if p.is_dir())


def resume_point(run_dir: str | os.PathLike, cfg: Config) -> Saved | None:
    """Where training ``cfg`` in ``run_dir`` continues: the newest usable checkpoint of any
    attempt (each unusable one passed over is named on stderr), refused with an ``InputError``
    naming the changed fields when it was trained with other settings; None: from the start."""
    saved = newest(checkpoint_dirs(run_dir))
    if saved is not None:
        check_resumable(saved.config, cfg, saved.path)
    return saved


def _next_ray_run(run_dir: Path) -> str:
    """A Ray run of this attempt's own, so that Ray never restores another attempt's record of
    its checkpoints (which may name a truncated or deleted one): within the attempt, Ray's
    checkpoint is one reported in it, newer than the driver's choice."""
    numbers = [int(p.name[len(ATTEMPT_PREFIX):]) for p in (run_dir / RAY_DIR).glob(f"{ATTEMPT_PREFIX}*")
               if p.name[len(ATTEMPT_PREFIX):].isdigit()]
    return f"{ATTEMPT_PREFIX}{max(numbers, default=0) + 1:03d}"


def finished_result(run_dir: str | os.PathLike, cfg: Config, data_root: str | os.PathLike) -> dict | None:
    """The saved result of a finished training of ``cfg`` (resolved, as ``train`` resolves it:
    its weights' SHA-256 included) on ``data_root`` in ``run_dir``; None unless it can be
    trusted: its training identity is this one and its checkpoint is usable, at the final
    iteration and of these training settings. With None, training resumes or reruns."""
    try:
        result = json.loads((Path(run_dir) / RESULT_FILE).read_text())
        checkpoint = Path(result["checkpoint"]).parent
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if result.get("training_id") != training_id(cfg, split_fingerprint(data_root, "training")["fingerprint"]):
        return None
    try:
        saved = verify(checkpoint)
    except Unusable:
        return None
    if saved.iteration != cfg.optim.iterations or training_settings(saved.config) != training_settings(cfg):
        return None
    return result


def train(cfg: Config, data_root: str | os.PathLike, run_dir: str | os.PathLike, workers: int = 1,
          gpus_per_worker: float = 0, address: str | None = None, resume: bool = True,
          backbone_weights: str | os.PathLike | None = None, backbone_dir: str | os.PathLike | None = None,
          from_scratch: bool = False, tracking_uri: str | None = None,
          mlflow_run_id: str | None = None, progress_callback: Progress | None = None,
          max_failures: int = MAX_FAILURES, hooks: Sequence[Hook] = ()) -> dict:
    """Train ``cfg`` with Ray Train on ``workers`` DDP workers; return the outcome.

    ``run_dir`` (layout above) is held for the whole call: a second ``train`` on it stops at
    once with ``RunDirBusy`` naming the holder. ``resume`` continues the run already in
    ``run_dir`` from its newest usable checkpoint (one line on stderr for each unusable one
    passed over); without it an existing run is an error. The encoder starts from the
    config's ImageNet checkpoint (``backbone_weights``, else the Hugging Face cache, else
    ``backbone_dir``: harness/weights.py), or from random init with ``from_scratch``; the
    choice and the file's SHA-256 become part of the resolved config. A worker that dies is
    restarted from the last checkpoint up to ``max_failures`` times. Progress records
    (iteration, total, loss, lr, eta_s, and val/* at evaluations) go to ``progress_callback``,
    or are printed to stderr. ``hooks`` (picklable) run on every worker after every iteration
    (harness/train/session.py).

    Result (also ``run_dir/train_result.json``): ``checkpoint`` (final checkpoint.pth),
    ``iterations``, ``start_iteration`` (where this call's last workers resumed), ``metrics``
    (last train record), ``val`` (last validation), ``wall_time_s`` (summed over ``attempts``),
    ``attempts``, ``run_dir``, ``data_root``, ``training_id``, ``train_fingerprint`` (the
    training split's, harness/data/fingerprint.py), ``config``, ``recipe``, ``profile``,
    ``mlflow_run_id``, ``init``, ``init_sha256``, ``amp``, ``backbone_file``; resuming a run
    that already finished trains nothing and returns its saved result with ``already_finished``.
    """
    _check_inputs(cfg, data_root, workers, gpus_per_worker)
    run_dir, data_root = Path(run_dir).resolve(), Path(data_root).resolve()
    cfg, found = weights.resolve(cfg, backbone_dir, backbone_weights, from_scratch)
    fingerprint = split_fingerprint(data_root, "training")
    with RunLock(run_dir, "train"):
        if not resume and ((run_dir / LEDGER_FILE).exists() or (run_dir / RAY_DIR).exists()):
            raise InputError(f"--run-dir {run_dir} already holds a training run; pass --resume to continue it "
                             f"or choose another --run-dir")
        done = finished_result(run_dir, cfg, data_root) if resume else None
        if done is not None:  # resuming a finished run trains nothing; its result stands
            return {**done, "already_finished": True}
        resume_from = resume_point(run_dir, cfg)
        ray_run = _next_ray_run(run_dir)
        ledger = _Ledger(run_dir / LEDGER_FILE, ray_run)
        show = progress_callback or _print_progress

        def progress(record: dict) -> None:
            ledger.beat()
            show(record)

        try:
            out, tracking, final = _fit(cfg, data_root, run_dir, ray_run, resume_from, workers, gpus_per_worker,
                                        address, found, tracking_uri, mlflow_run_id, progress, max_failures, hooks)
        finally:
            ledger.beat()
        out.update(checkpoint=str(final / MODEL_FILE), wall_time_s=ledger.wall_s(), attempts=len(ledger.attempts),
                   run_dir=str(run_dir), data_root=str(data_root),
                   training_id=training_id(cfg, fingerprint["fingerprint"]), train_fingerprint=fingerprint,
                   config=cfg.name, recipe=cfg.recipe, profile=cfg.profile,
                   mlflow_run_id=tracking["run_id"] if tracking else None,
                   init=weights.describe(cfg), init_sha256=cfg.model.init_sha256, amp=cfg.optim.amp,
                   backbone_file=str(found.path) if found else None)
        write_json(run_dir / RESULT_FILE, out)
    return out


def _fit(cfg: Config, data_root: Path, run_dir: Path, ray_run: str, resume_from: Saved | None, workers: int,
         gpus_per_worker: float, address: str | None, found, tracking_uri: str | None, mlflow_run_id: str | None,
         progress: Progress, max_failures: int, hooks: Sequence[Hook]) -> tuple[dict, dict | None, Path]:
    """One attempt on Ray Train: (rank 0's return value, the MLflow run, the final checkpoint)."""
    import ray.train
    from ray.train.torch import TorchConfig
    from ray.util.queue import Queue

    from harness.raylib import ensure_ray
    from harness.stages import policy

    fingerprint = split_fingerprint(data_root, "training")  # cached: train() computed it
    tracking, owns_run = train_run(cfg, run_dir, tracking_uri, mlflow_run_id, data_root, fingerprint,
                                   training_id(cfg, fingerprint["fingerprint"]))

    ensure_ray(address)
    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()
    placement_groups: list[str] = []

    def receive(record: dict) -> None:
        if PLACEMENT_GROUP in record:
            placement_groups.append(record[PLACEMENT_GROUP])
        else:
            progress(record)

    drainer = threading.Thread(target=_drain, args=(queue, stop, receive), daemon=True)
    drainer.start()
    use_gpu = gpus_per_worker > 0
    resources = policy(gpus_per_worker=gpus_per_worker).train.bundle()
    trainer = _trainer_class()(
        ray_worker,
        train_loop_config={"cfg": cfg, "data_root": str(data_root), "queue": queue,
                           "backbone_weights": str(found.path) if found else None,
                           "tracking": tracking, "hooks": tuple(hooks),
                           "resume_from": str(resume_from.path) if resume_from else None},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=ray_run, storage_path=str(run_dir / RAY_DIR),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # the SEGREPRO_* settings as they are now (experiments directory, cache) reach the
            # workers even where Ray was started before they were set
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
            last = newest(checkpoint_dirs(run_dir))
            end_train_run(tracking, error, killed=interrupt.requested(),
                          last_checkpoint=str(last.path / MODEL_FILE) if last else None)
        queue.shutdown(force=True)  # drained: the thread exits only on an empty queue
        release_placement_groups(placement_groups)
    if data_error:
        raise DataError(_data_error_message(cfg, data_root, data_error))
    # Ray holds a checkpoint only where one was reported in this attempt; else it resumed at the end
    final = Path(result.checkpoint.path) if result.checkpoint else resume_from.path
    return dict(result.return_value), tracking, final
