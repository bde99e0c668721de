"""The tracking contract: every name segrepro writes to MLflow and ``reports/`` reads back.

``harness.tracking`` is the one writer and ``reports.collect`` the reader; both take the
experiment, tag, param, metric and artifact names from here, so a name changes in one place.
Bottom floor: imports only the standard library (``reports/`` may import it).

Runs, by the ``segrepro.kind`` tag:
- ``reproduce``: one parent run per ``segrepro reproduce`` (``segrepro.argv``,
  ``segrepro.git_commit``);
- ``config``: one child run per configuration's work, found again by ``segrepro.run_key``; the
  flattened resolved config, ``git_commit``, ``versions.*`` and ``device.*`` as params;
  ``train/*`` and ``val/*`` curves (step = iteration), ``ss/*``, ``msflip/*``, ``bench/*``,
  ``bench_train/*``, ``wall_time_s`` and ``gpu_hours`` as final metrics;
- ``eval``: one run per ``segrepro eval`` logged to a store, with ``segrepro.checkpoint``,
  ``segrepro.source`` (who produced the weights), ``segrepro.protocol`` (whose rules) and
  ``segrepro.mode``; ``protocol.*`` params and ``MODE/mIoU``, ``MODE/mAcc``, ``MODE/aAcc``;
- ``kernels_profile`` (timed on a GPU) and ``kernels_check`` (the interpreter correctness
  check): ``segrepro kernels profile`` with ``--tracking-uri``, the profiler's rows as a CSV
  artifact, the device facts as params;
- a standalone ``segrepro train`` run carries ``segrepro.stage`` = train and no kind.
Every run carries ``segrepro.pid`` and ``segrepro.host`` (who wrote it last), and
``segrepro.run_dir`` where the writer has a run directory; ``segrepro.status`` is running,
finished, failed or killed (a run whose process died, closed by the next one in its run
directory; ``segrepro.last_checkpoint`` says how far it got). The reproduce driver finds its
work again by ``segrepro.training_id``, ``segrepro.run_key``, ``segrepro.eval_key`` and
``segrepro.bench_key``. Every run that read data (config, train, eval) records it: the root
(``segrepro.data_root``), each split's fingerprint and image count (``segrepro.train_fingerprint``,
``segrepro.val_fingerprint``, ``segrepro.train_images``, ``segrepro.val_images``) and, for a
validation split, what it is (``segrepro.val_data``, one of ``VAL_DATA_KINDS``, with the reason
in ``segrepro.val_data_note``): a figure is compared with a documented ADE20K one only on
``ade20k-val``.
"""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from urllib.parse import quote, unquote

EXPERIMENT = "segrepro"
DEFAULT_RUN_DIR = "runs/reproduce"  # reproduce's, and so where runs and report look by default
STORE_FILE = "mlflow.db"          # the SQLite store inside a run directory
ARTIFACTS_DIR = "mlartifacts"     # a SQLite store's artifacts, beside the database

# ---------------------------------------------------------------- tags
KIND = "segrepro.kind"
STATUS = "segrepro.status"
ERROR = "segrepro.error"
CONFIG = "segrepro.config"
RECIPE = "segrepro.recipe"
PROFILE = "segrepro.profile"
INIT = "segrepro.init"            # 'TAG sha256:HEX' or 'scratch'
RESUMED = "segrepro.resumed"
ARGV = "segrepro.argv"
GIT_COMMIT = "segrepro.git_commit"
STAGE = "segrepro.stage"
CHECKPOINT = "segrepro.checkpoint"
SOURCE = "segrepro.source"
PROTOCOL = "segrepro.protocol"
MODE = "segrepro.mode"
RUN_DIR = "segrepro.run_dir"
TRAINING_ID = "segrepro.training_id"
RUN_KEY = "segrepro.run_key"
EVAL_KEY = "segrepro.eval_key"
BENCH_KEY = "segrepro.bench_key"
DATA_ROOT = "segrepro.data_root"
TRAIN_FINGERPRINT = "segrepro.train_fingerprint"
VAL_FINGERPRINT = "segrepro.val_fingerprint"
TRAIN_IMAGES = "segrepro.train_images"
VAL_IMAGES = "segrepro.val_images"
VAL_DATA = "segrepro.val_data"
VAL_DATA_NOTE = "segrepro.val_data_note"
PID = "segrepro.pid"
HOST = "segrepro.host"
LAST_CHECKPOINT = "segrepro.last_checkpoint"
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: nests a child under its parent in the UI

# the fingerprint tag of each ADE20K split
FINGERPRINT = {"training": TRAIN_FINGERPRINT, "validation": VAL_FINGERPRINT}
# the image-count tag of each split
SPLIT_IMAGES = {"training": TRAIN_IMAGES, "validation": VAL_IMAGES}

# values of VAL_DATA (harness.data.fingerprint.val_data decides)
VAL_ADE20K = "ade20k-val"                # the official split, verified against the record of the official archive
VAL_UNVERIFIED = "ade20k-val-unverified"  # the official names and count, content not verifiable
VAL_GENERATED = "generated"              # written by segrepro data synth, whatever its names
VAL_OTHER = "other"                      # anything else (a subset, another dataset)
VAL_DATA_KINDS = (VAL_ADE20K, VAL_UNVERIFIED, VAL_GENERATED, VAL_OTHER)

# values of KIND
KIND_REPRODUCE = "reproduce"
KIND_CONFIG = "config"
KIND_EVAL = "eval"
KIND_KERNELS_PROFILE = "kernels_profile"
KIND_KERNELS_CHECK = "kernels_check"
STAGE_TRAIN = "train"

# values of STATUS
RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"
KILLED = "killed"

# ---------------------------------------------------------------- params
GIT_COMMIT_PARAM = "git_commit"
VERSIONS_PREFIX = "versions."
DEVICE_PREFIX = "device."          # device facts (kernels.device.device_facts) of a config run
PROTOCOL_PREFIX = "protocol."      # an eval run's protocol rules
NORMALIZATION_USED = "protocol.normalization_used"
BENCH_PREFIX = "bench."            # the benchmark's protocol (batch_size, precision, image_size, device)
TRAIN_CHECKPOINT = "train.checkpoint"
KERNELS_KIND_PARAM = "kind"        # "gpu" or "check" on a kernels run

# ---------------------------------------------------------------- metrics
# "PREFIX/FIGURE": the prefix says which stage measured it
TRAIN, VAL, SS, MSFLIP, BENCH = "train", "val", "ss", "msflip", "bench"
MIOU, MACC, AACC = "mIoU", "mAcc", "aAcc"
EVAL_FIGURES = (MIOU, MACC, AACC)
IMAGES = "images"                  # MODE/images: how many images an evaluation saw
SECONDS = "seconds"                # MODE/seconds: how long an evaluation took
# harness.benchmark's figures, each logged as bench/FIGURE
BENCH_FIGURES = ("images_per_s", "latency_median_ms", "latency_p90_ms", "slide_latency_median_ms", "gflops",
                 "params_m", "peak_memory_mb")
# harness.benchmark's training figures (segrepro bench --mode train), each logged as bench_train/FIGURE,
# and its protocol as bench_train.KEY params
BENCH_TRAIN = "bench_train"
BENCH_TRAIN_FIGURES = ("images_per_s", "step_median_ms", "step_p90_ms", "peak_memory_mb")
BENCH_TRAIN_PREFIX = "bench_train."  # crop, batch_size, precision, device, threads, peak_memory_kind
WALL_TIME = "wall_time_s"
GPU_HOURS = "gpu_hours"
CHECKS_FAILED = "checks_failed"


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested mapping as the params the writer logs: dotted keys, lists as JSON text."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def metric(prefix: str, figure: str) -> str:
    """The metric name of one figure: ``metric(SS, MIOU)`` is ``ss/mIoU``."""
    return f"{prefix}/{figure}"


TRAIN_LOSS = metric(TRAIN, "loss")
TRAIN_LR = metric(TRAIN, "lr")
VAL_MIOU = metric(VAL, MIOU)
SS_MIOU = metric(SS, MIOU)
MSFLIP_MIOU = metric(MSFLIP, MIOU)
(BENCH_IMAGES_PER_S, BENCH_LATENCY_MEDIAN_MS, BENCH_LATENCY_P90_MS, BENCH_SLIDE_LATENCY_MEDIAN_MS, BENCH_GFLOPS,
 BENCH_PARAMS_M, BENCH_PEAK_MEMORY_MB) = (metric(BENCH, figure) for figure in BENCH_FIGURES)
# harness.benchmark's training figures (segrepro bench --mode train), each logged as bench_train/FIGURE,
# and its protocol as bench_train.KEY params
BENCH_TRAIN = "bench_train"
BENCH_TRAIN_FIGURES = ("images_per_s", "step_median_ms", "step_p90_ms", "peak_memory_mb")
BENCH_TRAIN_PREFIX = "bench_train."  # crop, batch_size, precision, device, threads, peak_memory_kind


def kernel_metric(*parts: str) -> str:
    """A kernels run's metric for one row, e.g. ``attn_B_1_H_1_N_20_D_16/fp16/dq/max_abs_err``
    (MLflow metric names allow alphanumerics, ``_ - . /`` and spaces only)."""
    return "/".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", p).strip("_") for p in parts)


# ---------------------------------------------------------------- artifacts
KERNELS_ARTIFACT = {KIND_KERNELS_PROFILE: "kernels_profile.csv", KIND_KERNELS_CHECK: "kernels_check.csv"}


# ---------------------------------------------------------------- the store
def default_tracking_uri(run_dir: str | Path) -> str:
    """The SQLite store inside a run directory (MLflow 3.13+ refuses a ./mlruns file store)."""
    return f"sqlite:///{Path(run_dir).resolve() / STORE_FILE}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI, else None."""
    return Path(unquote(uri[len("sqlite:///"):])) if uri.startswith("sqlite:///") else None


def sqlite_store_problem(path: Path) -> str | None:
    """Why the existing file ``path`` is not a readable MLflow store, or None when it is.

    Opened read-only, so the probe never creates or changes anything: MLflow itself would turn
    an empty file into a new store and answer a damaged one with a SQLAlchemy traceback."""
    try:
        con = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if {"alembic_version", "experiments"} <= tables:
                con.execute("SELECT count(*) FROM experiments").fetchone()
        finally:
            con.close()
    except sqlite3.Error as e:
        return f"{path} is not a readable MLflow store ({e})"
    if not {"alembic_version", "experiments"} <= tables:
        what = "an empty file" if path.stat().st_size == 0 else "a SQLite database without MLflow's tables"
        return f"{path} is not a readable MLflow store ({what})"
    return None
