"""Read the MLflow runs and the documented table into one long-format table.

Every experiment, tag, param, metric and artifact name is read through ``harness.contract``
(which documents the runs ``harness.tracking`` writes): the configuration runs with their
final figures and training curves, the ``segrepro eval`` runs, and the newest kernels run of
each kind (timings on a GPU, the interpreter correctness check without one) with its CSV.

Reproduced metrics that have a documented counterpart take the documented name in the long
table (``ss/mIoU`` -> ``miou_ss``) so one pivot sets them side by side; every other metric
keeps its MLflow name. Each run also carries the data it read (``data_identity``), how its logged
settings differ from its recipe's full protocol (``protocol_gaps``) and its benchmarks' settings
(``bench_settings``): what decides whether a figure may be set against a documented one. The
store is opened only once it is known to be an MLflow store, so a report never creates one.
This module reads MLflow, ``harness.contract`` and ``harness.config``.
"""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd

from harness import contract
from harness.config import InputError, load_config, load_documented

SOURCE = "segrepro"  # the source name of reproduced figures in the long table
LONG_COLUMNS = ["config", "source", "metric", "value", "protocol", "profile", "run_id", "status"]
COUNTERPART = {contract.SS_MIOU: "miou_ss", contract.MSFLIP_MIOU: "miou_msflip",
               contract.BENCH_PARAMS_M: "params", contract.BENCH_IMAGES_PER_S: "fps"}
CURVE_METRICS = (contract.TRAIN_LOSS, contract.TRAIN_LR, contract.VAL_MIOU)
DATA_COLUMNS = ["data", "val_data", "val_data_note", "data_root", "val_images", "train_images", "val_fingerprint"]
RUN_COLUMNS = ["run_id", "start_time", "config", "recipe", "profile", "status", "error", "parent_run_id",
               "training_id", "device", "ss_protocol", "msflip_protocol", "bench_protocol", "training",
               "protocol_gaps", "bench", "bench_train", *DATA_COLUMNS]
EVAL_COLUMNS = ["run_id", "start_time", "config", "checkpoint", "source", "protocol", "mode", "mIoU",
                "protocol_text", *DATA_COLUMNS]
# What the report calls each kind of validation data (contract.VAL_DATA); runs logged before
# the data was recorded are "not recorded"
DATA_LABEL = {contract.VAL_ADE20K: "ADE20K val", contract.VAL_UNVERIFIED: "ADE20K val names, unverified",
              contract.VAL_GENERATED: "generated", contract.VAL_OTHER: "other data", "": "not recorded"}
# Config fields that do not change what a run measures: how often it logs, saves and validates,
# loader workers, evaluation batch, the attention implementation (parity-tested equal), the
# resolved weights' hash (the init tag says where training started) and the training precision
# (the reference trains in fp32 "unless --amp"; provenance shows it). Every other model, data,
# optim and eval field must be the full profile's for a figure to be set against a documented one.
NOT_PROTOCOL = {"model.init", "model.init_sha256", "model.attention", "data.num_workers", "optim.amp",
                "optim.eval_interval", "optim.checkpoint_interval", "optim.log_interval", "optim.seed",
                "eval.batch_size"}
PROTOCOL_SECTIONS = ("model.", "data.", "optim.", "eval.")
# the columns of each kind of kernels CSV (kernels/profile.py's rows) that the report needs
KERNEL_COLUMNS = {contract.KIND_KERNELS_PROFILE: ["kernel", "impl", "direction", "N", "tflops"],
                  contract.KIND_KERNELS_CHECK: ["shape", "dtype", "output", "max_abs_err", "limit", "passed"]}


class ReportError(Exception):
    """The store cannot be read at all (as opposed to partial data, which is normal)."""


@dataclass
class Collected:
    long: pd.DataFrame      # LONG_COLUMNS: documented and reproduced figures
    runs: pd.DataFrame      # one row per configuration run (all of them, oldest first)
    curves: pd.DataFrame    # run_id, config, profile, metric, step, value
    kernels: pd.DataFrame   # the newest kernels profile CSV (GPU timings), plus its run_id
    tracking_uri: str
    notes: list[str] = field(default_factory=list)
    evals: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=EVAL_COLUMNS))  # eval runs
    kernel_check: pd.DataFrame = field(default_factory=pd.DataFrame)  # the newest interpreter check CSV


def check_store(uri: str) -> None:
    """Fail fast, with one message, on a store that is not there or not an MLflow store.

    Opening a missing or empty SQLite file would silently create a store, a damaged one
    answers with a SQLAlchemy traceback, and an unreachable server would be retried by MLflow
    for minutes; none of that is what a report should do.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = contract.sqlite_path(uri)
        if path is None or not path.is_file():
            raise ReportError(f"no MLflow store at {path or uri} (tracking URI {uri})")
        problem = contract.sqlite_store_problem(path)
        if problem:
            raise ReportError(problem)
    elif parsed.scheme in ("http", "https"):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5)
        except requests.RequestException as e:
            raise ReportError(f"MLflow tracking server {uri} is unreachable: {type(e).__name__}") from None
    elif parsed.scheme in ("", "file"):
        path = Path(unquote(parsed.path))
        if not path.is_dir():
            raise ReportError(f"no MLflow store directory at {path} (tracking URI {uri})")


def _search_runs(client, experiment_id: str) -> pd.DataFrame:
    """All runs of the experiment, flattened as mlflow.search_runs does (metrics.*, params.*,
    tags.*). A client bound to the URI keeps the process-wide tracking URI untouched."""
    rows, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            row = {"run_id": run.info.run_id, "mlflow_status": run.info.status,
                   "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True)}
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows)


def _get(row: pd.Series, key: str, default: str = "") -> str:
    value = row.get(key)
    return default if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def _tag(row: pd.Series, name: str, default: str = "") -> str:
    return _get(row, f"tags.{name}", default)


def _param(row: pd.Series, name: str, default: str = "") -> str:
    """A param: a flattened config field (``eval.window``) or one of the contract's."""
    return _get(row, f"params.{name}", default)


def _of_kind(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The runs tagged ``kind``, oldest first."""
    column = f"tags.{contract.KIND}"
    if column not in df:
        return pd.DataFrame(columns=["run_id", "start_time", "mlflow_status"])
    return df[df[column] == kind].sort_values("start_time", kind="stable")


def eval_protocol(row: pd.Series, multi_scale: bool) -> str:
    """The protocol of a reproduced mIoU, from the run's own params (runs logged before the
    protocol rules existed lack the rule params; they are left out)."""
    window, stride = _param(row, "eval.window", "?"), _param(row, "eval.stride", "?")
    name = _param(row, "eval.protocol")
    text = (f"{name} protocol: " if name else "") + f"window {window}, stride {stride}"
    # a null normalisation rule (logged as "None") is the training normalisation
    shown = {"None": "as trained"}
    rules = [f"{label} {shown.get(_param(row, f'eval.{key}'), _param(row, f'eval.{key}'))}"
             for key, label in (("resize", "resize"), ("label_resolution", "labels"),
                                ("normalization", "normalisation"), ("bookkeeping", "bookkeeping"))
             if _param(row, f"eval.{key}")]
    if not multi_scale:
        return ", ".join([text + ", single scale"] + rules)
    text += f", scales {_param(row, 'eval.scales', '?')}"
    ratio_base = _param(row, "eval.ratio_base")
    text += f" of {ratio_base}" if ratio_base else ""
    if _param(row, "eval.flip") in ("True", "true", ""):
        text += " + flip"
    small = _param(row, "eval.small_views")
    return ", ".join([text + (f", small views {small}" if small else "")] + rules)


def _device(row: pd.Series) -> str:
    """Where the run's figures were measured: the benchmark's device, else the device facts."""
    return (_param(row, contract.BENCH_PREFIX + "device") or _param(row, contract.DEVICE_PREFIX + "gpu_name")
            or _param(row, contract.DEVICE_PREFIX + "device_type"))


def bench_protocol(row: pd.Series) -> str:
    bench = contract.BENCH_PREFIX
    return (f"{_device(row) or '?'}, batch {_param(row, bench + 'batch_size', '?')}, "
            f"{_param(row, bench + 'precision', '?')}, image {_param(row, bench + 'image_size', '?')}")


def training_provenance(row: pd.Series) -> str:
    """What the evaluated weights were trained from and in: the encoder's initialisation
    (``segrepro.init`` tag: 'TAG sha256:HEX' or 'scratch') and the training precision."""
    init = _tag(row, contract.INIT, "unknown init")
    if init.startswith("scratch"):
        init = "random init"
    return f"from {init}, trained in {_param(row, 'optim.amp', '?')}"


def _metric_protocol(metric: str, run: pd.Series) -> str:
    prefix = metric.split("/")[0]
    if prefix in (contract.SS, contract.MSFLIP):
        return f"{run[prefix + '_protocol']}; {run['training']}"
    if prefix == contract.BENCH:
        return run["bench_protocol"]
    return ""


def data_identity(row: pd.Series) -> dict:
    """The data a run read, from its tags (contract.VAL_DATA and the split tags)."""
    kind = _tag(row, contract.VAL_DATA)
    images = _tag(row, contract.VAL_IMAGES)
    label = DATA_LABEL.get(kind, kind)
    return {"data": f"{label} ({images} images)" if images else label, "val_data": kind,
            "val_data_note": _tag(row, contract.VAL_DATA_NOTE), "data_root": _tag(row, contract.DATA_ROOT),
            "val_images": images, "train_images": _tag(row, contract.TRAIN_IMAGES),
            "val_fingerprint": _tag(row, contract.VAL_FINGERPRINT)}


@functools.lru_cache(maxsize=None)
def full_protocol(config: str, recipe: str) -> dict | None:
    """The flattened config of ``config`` under ``recipe`` and the full profile, as the writer logs
    it (strings), or None when it does not resolve (a configuration outside the zoo)."""
    try:
        cfg = load_config(config, recipe=recipe or None, profile="full")
    except (InputError, OSError):
        return None
    return {k: str(v) for k, v in contract.flatten(cfg.to_dict()).items()}


def protocol_gaps(row: pd.Series, config: str, recipe: str) -> str:
    """How a run's logged settings differ from its recipe's full protocol ("" when they do not):
    a figure is compared with a documented one only at the full protocol, whatever the profile
    is called."""
    full = full_protocol(config, recipe)
    if full is None:
        return f"no zoo configuration {config!r} to compare with"
    gaps = [f"{k} {_param(row, k, 'not logged')} (full: {v})" for k, v in full.items()
            if k.startswith(PROTOCOL_SECTIONS) and k not in NOT_PROTOCOL and _param(row, k, "not logged") != v]
    if _tag(row, contract.INIT, "scratch").startswith("scratch"):
        gaps.insert(0, "encoder from random init (full: ImageNet weights)")
    return "; ".join(gaps)


def _gpu(device: str) -> bool:
    return device.startswith(("cuda", "GPU"))


def bench_settings(row: pd.Series, prefix: str, size_key: str) -> dict:
    """A benchmark's protocol params (``bench.*`` or ``bench_train.*``): device (a GPU named by the
    run's device facts), precision, batch and image or crop size."""
    device = _param(row, prefix + "device")
    gpu_name = _param(row, contract.DEVICE_PREFIX + "gpu_name")
    shown = f"GPU {gpu_name}" if _gpu(device) and gpu_name else device
    return {"device": shown, "gpu": _gpu(device), "precision": _param(row, prefix + "precision"),
            "batch": _param(row, prefix + "batch_size"), "size": _param(row, prefix + size_key),
            "memory_kind": _param(row, prefix + "peak_memory_kind")}


def _writer_gone(row: pd.Series) -> bool:
    """Whether a run tagged running was written by a process of this host that no longer exists
    (killed before anyone reran it; the next run in its directory closes it as KILLED)."""
    pid = _tag(row, contract.PID)
    if _tag(row, contract.HOST) != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _config_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration run with the fields the views need, oldest first."""
    out = []
    for _, row in _of_kind(df, contract.KIND_CONFIG).iterrows():
        # The segrepro tag is the harness's own view; MLflow's status is the fallback for a run
        # that died before it could set the tag, and wins over a "running" tag that a dead
        # process never updated.
        status = _tag(row, contract.STATUS) or _get(row, "mlflow_status").lower()
        if status == contract.RUNNING and row["mlflow_status"] in ("FAILED", "KILLED"):
            status = row["mlflow_status"].lower()
        if status == contract.RUNNING and _writer_gone(row):
            status = f"{contract.KILLED} (its process is gone)"
        out.append({
            "run_id": row["run_id"], "start_time": row["start_time"],
            "config": _tag(row, contract.CONFIG) or _param(row, "name", "?"),
            "recipe": _tag(row, contract.RECIPE) or _param(row, "recipe"),
            "profile": _tag(row, contract.PROFILE) or _param(row, "profile"),
            "status": status, "error": _tag(row, contract.ERROR),
            "parent_run_id": _tag(row, contract.PARENT_RUN),
            "training_id": _tag(row, contract.TRAINING_ID), "device": _device(row),
            "ss_protocol": eval_protocol(row, multi_scale=False),
            "msflip_protocol": eval_protocol(row, multi_scale=True), "bench_protocol": bench_protocol(row),
            "training": training_provenance(row),
            "protocol_gaps": protocol_gaps(row, _tag(row, contract.CONFIG) or _param(row, "name", "?"),
                                           _tag(row, contract.RECIPE) or _param(row, "recipe")),
            "bench": bench_settings(row, contract.BENCH_PREFIX, "image_size"),
            "bench_train": bench_settings(row, contract.BENCH_TRAIN_PREFIX, "crop"),
            **data_identity(row),
            **{k: row[k] for k in row.index if k.startswith("metrics.") and pd.notna(row[k])},
        })
    return pd.DataFrame(out) if out else pd.DataFrame(columns=RUN_COLUMNS)


def _eval_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per finished ``segrepro eval`` run (EVAL_COLUMNS), oldest first."""
    df = _of_kind(df, contract.KIND_EVAL)
    out = []
    for _, row in df[df["mlflow_status"] == "FINISHED"].iterrows():
        mode = _tag(row, contract.MODE, contract.SS)
        value = row.get(f"metrics.{contract.metric(mode, contract.MIOU)}")
        text = ", ".join(f"{k} {_param(row, contract.PROTOCOL_PREFIX + k)}" for k in
                         ("window", "stride", "test_scale", "resize", "label_resolution", "bookkeeping"))
        out.append({"run_id": row["run_id"], "start_time": row["start_time"], "config": _tag(row, contract.CONFIG),
                    "checkpoint": _tag(row, contract.CHECKPOINT), "source": _tag(row, contract.SOURCE),
                    "protocol": _tag(row, contract.PROTOCOL), "mode": mode,
                    "mIoU": float(value) if value is not None and pd.notna(value) else float("nan"),
                    "protocol_text": text + f", normalisation {_param(row, contract.NORMALIZATION_USED)}",
                    **data_identity(row)})
    return pd.DataFrame(out, columns=EVAL_COLUMNS)


def _long_table(runs: pd.DataFrame) -> pd.DataFrame:
    rows = [{**d, "profile": "", "run_id": "", "status": ""} for d in load_documented()]
    for d in rows:
        del d["unit"]
    for _, run in runs.iterrows():
        common = {"config": run["config"], "source": SOURCE, "profile": run["profile"],
                  "run_id": run["run_id"], "status": run["status"]}
        metrics = [k for k in run.index if k.startswith("metrics.") and pd.notna(run[k])]
        for key in metrics:
            name = key[len("metrics."):]
            rows.append({**common, "metric": COUNTERPART.get(name, name), "value": float(run[key]),
                         "protocol": _metric_protocol(name, run)})
        if not metrics:  # still list the run, so its status shows in results.csv
            rows.append({**common, "metric": "", "value": float("nan"), "protocol": ""})
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


def _curves(client, runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, run in runs.iterrows():
        for metric in CURVE_METRICS:
            if f"metrics.{metric}" not in run.index or pd.isna(run[f"metrics.{metric}"]):
                continue
            for m in client.get_metric_history(run["run_id"], metric):
                rows.append({"run_id": run["run_id"], "config": run["config"], "profile": run["profile"],
                             "metric": metric, "step": m.step, "value": m.value})
    curves = pd.DataFrame(rows, columns=["run_id", "config", "profile", "metric", "step", "value"])
    return curves.sort_values(["run_id", "metric", "step"], kind="stable").reset_index(drop=True)


@contextlib.contextmanager
def _no_progress_bar():
    """MLflow draws a progress bar per artifact download; a report prints figures, not bars."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def _kernels(df: pd.DataFrame, uri: str, kind: str, notes: list[str]) -> pd.DataFrame:
    """The CSV of the newest kernels run of ``kind`` that has a readable one, plus its run_id
    (older runs are other devices or older code; the report shows one consistent sweep)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    artifact, needed = contract.KERNELS_ARTIFACT[kind], KERNEL_COLUMNS[kind]
    for _, row in _of_kind(df, kind).iloc[::-1].iterrows():
        with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
            try:
                path = mlflow.artifacts.download_artifacts(run_id=row["run_id"], artifact_path=artifact,
                                                           dst_path=tmp, tracking_uri=uri)
                table = pd.read_csv(path)
            except (MlflowException, OSError, pd.errors.ParserError) as e:
                notes.append(f"{kind} run {row['run_id']}: no readable {artifact} ({type(e).__name__})")
                continue
        missing = [c for c in needed if c not in table]
        if missing:
            notes.append(f"{kind} run {row['run_id']}: {artifact} lacks {', '.join(missing)}")
            continue
        table["run_id"] = row["run_id"]
        return table
    return pd.DataFrame(columns=needed + ["run_id"])


def collect(tracking_uri: str, experiment_name: str = contract.EXPERIMENT) -> Collected:
    """Everything the report shows; raises ReportError only when the store cannot be read."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    check_store(tracking_uri)
    notes: list[str] = []
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        df = _search_runs(client, experiment.experiment_id) if experiment else pd.DataFrame()
    except MlflowException as e:
        raise ReportError(f"cannot read MLflow store {tracking_uri}: {e.message}") from None
    except SQLAlchemyError as e:  # damage the read-only probe could not see
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ReportError(f"MLflow store {tracking_uri} is not readable: {first}") from None
    if experiment is None:
        notes.append(f"no experiment {experiment_name!r} in {tracking_uri}: documented figures only")
    runs = _config_runs(df)
    return Collected(long=_long_table(runs), runs=runs, curves=_curves(client, runs),
                     kernels=_kernels(df, tracking_uri, contract.KIND_KERNELS_PROFILE, notes),
                     tracking_uri=tracking_uri, notes=notes, evals=_eval_runs(df),
                     kernel_check=_kernels(df, tracking_uri, contract.KIND_KERNELS_CHECK, notes))
