"""Read the MLflow runs and the documented table into one long-format table.

The contract with ``segrepro reproduce`` (which writes the runs): experiment "segrepro"; one
child run per configuration tagged ``segrepro.kind=config`` with ``segrepro.config``,
``segrepro.recipe``, ``segrepro.profile``, ``segrepro.status`` and ``segrepro.error``; the
flattened resolved config as params; final figures as metrics (``ss/mIoU``, ``bench/...``)
and the training curves as metric histories (step = iteration). Kernel profiles are runs
tagged ``segrepro.kind=kernels_profile`` with a ``kernels_profile.csv`` artifact. ``segrepro
eval`` runs are tagged ``segrepro.kind=eval`` with ``segrepro.checkpoint``, ``segrepro.source``
(who produced the weights), ``segrepro.protocol`` and ``segrepro.mode``, and log ``MODE/mIoU``.

Reproduced metrics that have a documented counterpart take the documented name in the long
table (``ss/mIoU`` -> ``miou_ss``) so one pivot sets them side by side; every other metric
keeps its MLflow name. This module reads MLflow and ``harness.config`` only.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pandas as pd

from harness.config import load_documented

EXPERIMENT = "segrepro"
SOURCE = "segrepro"  # the source name of reproduced figures in the long table
LONG_COLUMNS = ["config", "source", "metric", "value", "protocol", "profile", "run_id", "status"]
COUNTERPART = {"ss/mIoU": "miou_ss", "msflip/mIoU": "miou_msflip",
               "bench/params_m": "params", "bench/images_per_s": "fps"}
CURVE_METRICS = ("train/loss", "train/lr", "val/mIoU")
RUN_COLUMNS = ["run_id", "start_time", "config", "recipe", "profile", "status", "error", "parent_run_id",
               "config_hash", "device", "ss_protocol", "msflip_protocol", "bench_protocol", "training"]
EVAL_COLUMNS = ["run_id", "start_time", "config", "checkpoint", "source", "protocol", "mode", "mIoU",
                "protocol_text"]
KERNELS_ARTIFACT = "kernels_profile.csv"
KERNEL_COLUMNS = ["kernel", "impl", "direction", "B", "H", "N", "D", "C", "dtype", "stat",
                  "ms", "tflops", "gbps", "frac_peak"]


class ReportError(Exception):
    """The store cannot be read at all (as opposed to partial data, which is normal)."""


@dataclass
class Collected:
    long: pd.DataFrame      # LONG_COLUMNS: documented and reproduced figures
    runs: pd.DataFrame      # one row per configuration run (all of them, oldest first)
    curves: pd.DataFrame    # run_id, config, profile, metric, step, value
    kernels: pd.DataFrame   # the newest kernels profile CSV, plus its run_id
    tracking_uri: str
    notes: list[str] = field(default_factory=list)
    evals: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=EVAL_COLUMNS))  # eval runs


def default_tracking_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


def check_store(uri: str) -> None:
    """Fail fast, with one message, on a store that is not there.

    Opening a missing SQLite file would silently create an empty store, and an unreachable
    server would be retried by MLflow for minutes; neither is what a report should do.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = Path(unquote(uri[len("sqlite:///"):]))
        if not path.is_file():
            raise ReportError(f"no MLflow store at {path} (tracking URI {uri})")
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


def eval_protocol(row: pd.Series, multi_scale: bool) -> str:
    """The protocol of a reproduced mIoU, from the run's own params (runs logged before the
    protocol rules existed lack the rule params; they are left out)."""
    window, stride = _get(row, "params.eval.window", "?"), _get(row, "params.eval.stride", "?")
    name = _get(row, "params.eval.protocol")
    text = (f"{name} protocol: " if name else "") + f"window {window}, stride {stride}"
    # a null normalisation rule (logged as "None") is the training normalisation
    shown = {"None": "as trained"}
    rules = [f"{label} {shown.get(_get(row, f'params.eval.{key}'), _get(row, f'params.eval.{key}'))}"
             for key, label in (("resize", "resize"), ("label_resolution", "labels"),
                                ("normalization", "normalisation"), ("bookkeeping", "bookkeeping"))
             if _get(row, f"params.eval.{key}")]
    if not multi_scale:
        return ", ".join([text + ", single scale"] + rules)
    text += f", scales {_get(row, 'params.eval.scales', '?')}"
    ratio_base = _get(row, "params.eval.ratio_base")
    text += f" of {ratio_base}" if ratio_base else ""
    if _get(row, "params.eval.flip") in ("True", "true", ""):
        text += " + flip"
    small = _get(row, "params.eval.small_views")
    return ", ".join([text + (f", small views {small}" if small else "")] + rules)


def bench_protocol(row: pd.Series) -> str:
    device = _get(row, "params.bench.device") or _get(row, "params.device", "?")
    return (f"{device}, batch {_get(row, 'params.bench.batch_size', '?')}, "
            f"{_get(row, 'params.bench.precision', '?')}, image {_get(row, 'params.bench.image_size', '?')}")


def training_provenance(row: pd.Series) -> str:
    """What the evaluated weights were trained from and in: the encoder's initialisation
    (``segrepro.init`` tag: 'TAG sha256:HEX' or 'scratch') and the training precision."""
    init = _get(row, "tags.segrepro.init", "unknown init")
    if init.startswith("scratch"):
        init = "random init"
    return f"from {init}, trained in {_get(row, 'params.optim.amp', '?')}"


def _metric_protocol(metric: str, run: pd.Series) -> str:
    if metric.startswith(("ss/", "msflip/")):
        return f"{run[metric.split('/')[0] + '_protocol']}; {run['training']}"
    if metric.startswith("bench/"):
        return run["bench_protocol"]
    return ""


def _config_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration run with the fields the views need, oldest first."""
    if "tags.segrepro.kind" not in df:
        return pd.DataFrame(columns=RUN_COLUMNS)
    df = df[df["tags.segrepro.kind"] == "config"].sort_values("start_time", kind="stable")
    out = []
    for _, row in df.iterrows():
        # The segrepro tag is the harness's own view; MLflow's status is the fallback for a run
        # that died before it could set the tag, and wins over a "running" tag that a dead
        # process never updated.
        status = _get(row, "tags.segrepro.status") or _get(row, "mlflow_status").lower()
        if status == "running" and row["mlflow_status"] in ("FAILED", "KILLED"):
            status = row["mlflow_status"].lower()
        out.append({
            "run_id": row["run_id"], "start_time": row["start_time"],
            "config": _get(row, "tags.segrepro.config") or _get(row, "params.name", "?"),
            "recipe": _get(row, "tags.segrepro.recipe") or _get(row, "params.recipe"),
            "profile": _get(row, "tags.segrepro.profile") or _get(row, "params.profile"),
            "status": status, "error": _get(row, "tags.segrepro.error"),
            "parent_run_id": _get(row, "tags.mlflow.parentRunId"),
            "config_hash": _get(row, "tags.segrepro.config_hash"),
            "device": _get(row, "params.bench.device") or _get(row, "params.device"),
            "ss_protocol": eval_protocol(row, multi_scale=False),
            "msflip_protocol": eval_protocol(row, multi_scale=True), "bench_protocol": bench_protocol(row),
            "training": training_provenance(row),
            **{k: row[k] for k in row.index if k.startswith("metrics.") and pd.notna(row[k])},
        })
    return pd.DataFrame(out) if out else pd.DataFrame(columns=RUN_COLUMNS)


def _eval_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per finished ``segrepro eval`` run (EVAL_COLUMNS), oldest first."""
    if "tags.segrepro.kind" not in df:
        return pd.DataFrame(columns=EVAL_COLUMNS)
    df = df[(df["tags.segrepro.kind"] == "eval") & (df["mlflow_status"] == "FINISHED")]
    out = []
    for _, row in df.sort_values("start_time", kind="stable").iterrows():
        mode = _get(row, "tags.segrepro.mode", "ss")
        value = row.get(f"metrics.{mode}/mIoU")
        text = ", ".join(f"{k} {_get(row, f'params.protocol.{k}')}" for k in
                         ("window", "stride", "test_scale", "resize", "label_resolution", "bookkeeping"))
        out.append({"run_id": row["run_id"], "start_time": row["start_time"], "config": _get(row, "tags.segrepro.config"),
                    "checkpoint": _get(row, "tags.segrepro.checkpoint"), "source": _get(row, "tags.segrepro.source"),
                    "protocol": _get(row, "tags.segrepro.protocol"), "mode": mode,
                    "mIoU": float(value) if value is not None and pd.notna(value) else float("nan"),
                    "protocol_text": text + f", normalisation {_get(row, 'params.protocol.normalization_used')}"})
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


def _kernels(df: pd.DataFrame, uri: str, notes: list[str]) -> pd.DataFrame:
    """The newest kernels profile run that has its CSV (older profiles are other devices or
    older code; the report shows one consistent sweep)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    empty = pd.DataFrame(columns=KERNEL_COLUMNS + ["run_id"])
    if df.empty or "tags.segrepro.kind" not in df:
        return empty
    profiles = df[df["tags.segrepro.kind"] == "kernels_profile"].sort_values("start_time", ascending=False)
    for _, row in profiles.iterrows():
        with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
            try:
                path = mlflow.artifacts.download_artifacts(run_id=row["run_id"], artifact_path=KERNELS_ARTIFACT,
                                                           dst_path=tmp, tracking_uri=uri)
                table = pd.read_csv(path)
            except (MlflowException, OSError, pd.errors.ParserError) as e:
                notes.append(f"kernels profile run {row['run_id']}: no readable {KERNELS_ARTIFACT} "
                             f"({type(e).__name__})")
                continue
        missing = [c for c in ("kernel", "impl", "N", "tflops") if c not in table]
        if missing:
            notes.append(f"kernels profile run {row['run_id']}: {KERNELS_ARTIFACT} lacks {', '.join(missing)}")
            continue
        table["run_id"] = row["run_id"]
        return table
    return empty


def collect(tracking_uri: str, experiment_name: str = EXPERIMENT) -> Collected:
    """Everything the report shows; raises ReportError only when the store cannot be read."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    check_store(tracking_uri)
    notes: list[str] = []
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        df = _search_runs(client, experiment.experiment_id) if experiment else pd.DataFrame()
    except MlflowException as e:
        raise ReportError(f"cannot read MLflow store {tracking_uri}: {e.message}") from None
    if experiment is None:
        notes.append(f"no experiment {experiment_name!r} in {tracking_uri}: documented figures only")
    runs = _config_runs(df)
    return Collected(long=_long_table(runs), runs=runs, curves=_curves(client, runs),
                     kernels=_kernels(df, tracking_uri, notes), tracking_uri=tracking_uri, notes=notes,
                     evals=_eval_runs(df))
