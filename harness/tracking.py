"""The one MLflow writer: every run segrepro records goes through here.

One parent run per ``reproduce`` and one child run per configuration (found again by the hash
of its resolved config); the standalone ``segrepro train`` run and rank 0's training curves;
``segrepro eval`` runs; ``segrepro kernels profile`` runs. The names are those of
``harness.contract``, which ``reports/`` reads them by. Every run created here carries the
writer's pid and host (and its run directory, where it has one), so a run left RUNNING by a
dead process is found and closed by the next process holding that run directory.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.atomic import write_text
from harness.config import Config, InputError
from harness.contract import (ARGV, ARTIFACTS_DIR, CHECKPOINT, CHECKS_FAILED, CONFIG, DATA_ROOT, DEVICE_PREFIX, ERROR,
                              EVAL_FIGURES, EXPERIMENT, FAILED, FINGERPRINT, FINISHED, GIT_COMMIT, GIT_COMMIT_PARAM,
                              HOST, IMAGES, INIT, KERNELS_ARTIFACT, KERNELS_KIND_PARAM, KILLED, KIND, KIND_CONFIG,
                              KIND_EVAL, KIND_KERNELS_CHECK, KIND_KERNELS_PROFILE, KIND_REPRODUCE, LAST_CHECKPOINT,
                              MODE, NORMALIZATION_USED, PARENT_RUN, PID, PROFILE, PROTOCOL, PROTOCOL_PREFIX, RECIPE,
                              RESUMED, RUNNING, RUN_DIR, RUN_KEY, SOURCE, SPLIT_IMAGES, STAGE, STAGE_TRAIN, STATUS,
                              TRAINING_ID, VAL_DATA, VAL_DATA_NOTE, VAL_GENERATED, VERSIONS_PREFIX, flatten,
                              kernel_metric, metric, sqlite_path, sqlite_store_problem)
from harness.contract import default_tracking_uri  # noqa: F401  (callers take it from the writer)

_DATASETS = threading.Lock()
# the experiment kind MLflow 3's UI reads: the classic view of runs, metrics and models
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
TRAIN_RUN_FILE = "mlflow_run_id"  # a standalone training run directory's MLflow run, reused on resume


def check_tracking_uri(uri: str) -> None:
    """Fail before any work starts if the store cannot be reached or is not an MLflow store.
    A missing SQLite file is fine (MLflow creates it); an existing one must be a store."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status != 200:
                    raise InputError(f"tracking URI {uri}: /health answered {resp.status}")
        except (urllib.error.URLError, OSError) as e:
            raise InputError(f"tracking URI {uri}: unreachable ({getattr(e, 'reason', e)})") from None
    elif (path := sqlite_path(uri)) is not None:
        _check_sqlite_writable(uri, path)
        if path.exists():
            problem = sqlite_store_problem(path)
            if problem:
                raise InputError(f"tracking URI {uri}: {problem}")
    else:
        raise InputError(f"tracking URI {uri!r}: expected sqlite:///PATH or http(s)://HOST:PORT")


def _check_sqlite_writable(uri: str, path: Path) -> None:
    """A store SQLite cannot open or write fails here, in one line: MLflow would retry opening it
    for two minutes, then answer with a SQLAlchemy traceback."""
    what = f"tracking URI {uri}"
    if path.exists() and not path.is_file():
        raise InputError(f"{what}: {path} is not a file; pass the path of a SQLite file (created if missing)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{what}: cannot create its directory {path.parent} ({e.strerror or e})") from None
    # SQLite writes the file and, beside it, its journal; tried for real (permission bits say
    # nothing of a read-only mount, or to root)
    for target, probe in ((path, lambda: open(path, "r+b").close()),
                          (path.parent, lambda: tempfile.TemporaryFile(dir=path.parent).close())):
        try:
            if target.exists() or target == path.parent:
                probe()
        except OSError as e:
            raise InputError(f"{what}: cannot write {target} ({e.strerror or e}); make it writable or choose "
                             f"another --run-dir / --tracking-uri") from None


def init_tag(cfg: Config) -> str:
    """What the encoder started from, as the report shows it: 'TAG sha256:HEX' or 'scratch'."""
    m = cfg.model
    if m.init == "scratch" or not m.init_sha256:
        return "scratch"
    return f"{m.pretrained or m.backbone} sha256:{m.init_sha256}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def package_versions() -> dict:
    out = {}
    for pkg in ("segrepro", "torch", "torchvision", "timm", "triton", "ray", "mlflow", "numpy"):
        try:
            out[f"{VERSIONS_PREFIX}{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[f"{VERSIONS_PREFIX}{pkg}"] = "absent"
    return out


def _metric_batch(metrics: dict, step: int) -> list:
    """MLflow Metric entities; a None value (a figure not measured) is left out."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]


class Tracker:
    """Every writer's handle on the store (reproduce, train, eval, kernels profile); thread-safe
    (MlflowClient calls with explicit run ids). Construction checks the store (see
    ``check_tracking_uri``) and creates the experiment if needed. ``run_dir``, where given, is
    tagged on every run created here: ``close_stale`` finds them by it."""

    def __init__(self, uri: str, run_dir: str | Path | None = None):
        from mlflow import MlflowClient

        check_tracking_uri(uri)
        self.uri = uri
        self.run_dir = Path(run_dir).resolve() if run_dir is not None else None
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            # a SQLite store keeps its artifacts beside the database; a server decides for itself
            path = sqlite_path(uri)
            location = (path.resolve().parent / ARTIFACTS_DIR).as_uri() if path else None
            # MLflow 3's UI opens an experiment without this tag in its GenAI view
            self.experiment_id = self.client.create_experiment(
                EXPERIMENT, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # a store created before the tag was set
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def _owner(self) -> dict:
        """The tags naming the process that writes a run now."""
        tags = {PID: str(os.getpid()), HOST: socket.gethostname()}
        if self.run_dir is not None:
            tags[RUN_DIR] = str(self.run_dir)
        return tags

    def _create_run(self, run_name: str, tags: dict) -> str:
        return self.client.create_run(self.experiment_id, run_name=run_name, tags={**tags, **self._owner()}).info.run_id

    def _search(self, filter_string: str) -> list:
        """Every run of the experiment matching ``filter_string``, newest first."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            runs += page
            token = page.token
            if not token:
                return runs

    def set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # ------------------------------------------------------------ reproduce: parent and children

    def start_parent(self, argv: list[str]) -> str:
        return self._create_run(f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}",
                                {KIND: KIND_REPRODUCE, ARGV: " ".join(argv), GIT_COMMIT: git_commit(),
                                 STATUS: RUNNING})

    def finished_child(self, name: str, run_key: str) -> str | None:
        """The finished child run of configuration ``name`` with this run key
        (``harness.identity.run_key``: same training, data, protocols and benchmark)."""
        runs = self._children(name, run_key, FINISHED)
        return runs[0].info.run_id if runs else None

    def _children(self, name: str, run_key: str, status: str | None = None):
        flt = f"tags.`{RUN_KEY}` = '{run_key}' and tags.`{CONFIG}` = '{name}' and tags.`{KIND}` = '{KIND_CONFIG}'"
        if status:
            flt += f" and tags.`{STATUS}` = '{status}'"
        return self._search(flt)

    def child_run(self, cfg: Config, parent_id: str, facts: dict, identity: dict) -> tuple[str, bool]:
        """The unfinished child of an interrupted reproduction of the same work (so its curves
        continue), or a new one. ``identity``: the tags naming the work (``RUN_KEY``,
        ``TRAINING_ID``, ...). Returns (run_id, resumed)."""
        runs = [r for r in self._children(cfg.name, identity[RUN_KEY]) if r.data.tags.get(STATUS) != FINISHED]
        tags = {KIND: KIND_CONFIG, CONFIG: cfg.name, RECIPE: cfg.recipe, PROFILE: cfg.profile, **identity,
                STATUS: RUNNING, PARENT_RUN: parent_id, INIT: init_tag(cfg)}
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(run_id, {**tags, **self._owner(), RESUMED: "true"})
            return run_id, True
        run_id = self._create_run(cfg.name, tags)
        self.log_params(run_id, {**flatten(cfg.to_dict()), GIT_COMMIT_PARAM: git_commit(), **package_versions(),
                                 **{f"{DEVICE_PREFIX}{k}": v for k, v in facts.items()}})
        return run_id, False

    def close_stale(self, run_dir: str | Path) -> list[str]:
        """Close the runs of ``run_dir`` still RUNNING: the caller holds the run directory's
        exclusive lock, so whoever left them running is dead. Returns their ids."""
        where = str(Path(run_dir).resolve())
        stale = [r.info.run_id for r in self._search("attributes.status = 'RUNNING'")
                 if r.data.tags.get(RUN_DIR) == where]
        for run_id in stale:
            self.kill(run_id, None)
        return stale

    def kill(self, run_id: str, last_checkpoint: str | None) -> None:
        """Mark a run KILLED (its process stopped or died), with the checkpoint it got to."""
        self.set_tags(run_id, {STATUS: KILLED, **({LAST_CHECKPOINT: last_checkpoint} if last_checkpoint else {})})
        self.client.set_terminated(run_id, status="KILLED")

    def log_final_metrics(self, run_id: str, metrics: dict) -> None:
        """Log the final figures the run does not hold yet: a driver killed between logging them
        and closing the run logs each once, not again on its rerun."""
        held = self.client.get_run(run_id).data.metrics
        self.log_metrics(run_id, {k: v for k, v in metrics.items() if k not in held})

    def log_dataset(self, run_id: str, root: str | Path, splits: dict[str, dict | str], context: str) -> None:
        """The dataset a run read: its root, each split's fingerprint and image count (``splits``:
        ADE20K split -> its ``split_fingerprint`` record, or the bare fingerprint where the caller
        holds no more) and, with a validation split, what that split is
        (``harness.data.fingerprint.val_data``) as tags; and each split as an MLflow dataset input
        with ``context`` (e.g. training, eval), which the MLflow UI lists with the run."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        from harness.data.fingerprint import val_data

        root = str(Path(root).resolve())
        splits = {split: r if isinstance(r, dict) else {"fingerprint": r} for split, r in splits.items()}
        tags = {DATA_ROOT: root}
        for split, record in splits.items():
            tags[FINGERPRINT[split]] = record["fingerprint"]
            if "images" in record:
                tags[SPLIT_IMAGES[split]] = record["images"]
        if "validation" in splits:
            tags[VAL_DATA], tags[VAL_DATA_NOTE] = val_data(root, splits["validation"])
        self.set_tags(run_id, tags)
        # the UI names the data by what it is: generated data never shows as ADE20K
        name = "generated (ADE20K layout)" if tags.get(VAL_DATA) == VAL_GENERATED else "ADE20K"
        # the digest column holds 36 characters; the tags above hold the whole fingerprint
        inputs = [DatasetInput(Dataset(name=f"{name}/{split}", digest=record["fingerprint"][:36], source_type="local",
                                       source=json.dumps({"uri": root})),
                               tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
                  for split, record in splits.items()]
        from mlflow.exceptions import MlflowException

        # MLflow's SQL store inserts a dataset it has not seen yet without guarding against a
        # concurrent insert of the same one (name, digest): configurations of one reproduce log
        # the same data at once. One writer at a time here; a retry after another process won
        # the race finds the row.
        with _DATASETS:
            try:
                self.client.log_inputs(run_id, datasets=inputs)
            except MlflowException:
                self.client.log_inputs(run_id, datasets=inputs)

    # ------------------------------------------------------------ other runs

    def start_train(self, cfg: Config) -> str:
        """The run of a standalone ``segrepro train``, every config value a param."""
        run_id = self._create_run(f"train-{cfg.name}-{cfg.recipe}-{cfg.profile}",
                                  {CONFIG: cfg.name, RECIPE: cfg.recipe, PROFILE: cfg.profile,
                                   STAGE: STAGE_TRAIN, INIT: init_tag(cfg),
                                   STATUS: RUNNING})
        self.log_params(run_id, flatten(cfg.to_dict()))
        return run_id

    def log_eval(self, cfg: Config, record: dict) -> str:
        """One finished ``kind=eval`` run holding an evaluation's figures and its protocol."""
        protocol = record["protocol"]
        mode = protocol["mode"]
        run_id = self._create_run(f"eval-{cfg.name}-{protocol['name']}",
                                  {KIND: KIND_EVAL, CONFIG: cfg.name, RECIPE: cfg.recipe,
                                   CHECKPOINT: record["checkpoint"], SOURCE: record["source"],
                                   PROTOCOL: protocol["name"], MODE: mode,
                                   STATUS: RUNNING})
        self.log_params(run_id, {**flatten(cfg.to_dict()), **flatten(protocol, PROTOCOL_PREFIX),
                                 NORMALIZATION_USED: record["normalization"], GIT_COMMIT_PARAM: git_commit(),
                                 **package_versions()})
        self.log_metrics(run_id, {metric(mode, k): record[k] for k in (*EVAL_FIGURES, IMAGES)})
        if record.get("data_root"):
            from harness.data.fingerprint import split_fingerprint

            root = record["data_root"]
            self.log_dataset(run_id, root, {"validation": split_fingerprint(root, "validation")}, context="eval")
        self.finish(run_id)
        return run_id

    def log_kernel_profile(self, kind: str, facts: dict, rows: list[dict], table: str, params: dict) -> str:
        """One finished run per ``segrepro kernels profile``: the device facts and the options
        as params, each row's figures as metrics and the rows as a CSV artifact. ``kind`` and
        ``rows`` are the profiler's ("gpu": timings, "check": the interpreter correctness
        check), ``table`` their CSV text."""
        run_kind = {"gpu": KIND_KERNELS_PROFILE, "check": KIND_KERNELS_CHECK}[kind]
        metrics = {}
        for r in rows:
            if kind == "check":
                # a NaN error (a broken kernel) stays in the CSV; checks_failed counts it
                if not math.isnan(r["max_abs_err"]):
                    metrics[kernel_metric(r["shape"], r["dtype"], r["output"], "max_abs_err")] = r["max_abs_err"]
            elif r["ms"] is not None:
                key = (r["shape"], r["impl"], r["direction"])
                metrics[kernel_metric(*key, f"ms_{r['stat']}")] = r["ms"]
                if r["stat"] == "median":
                    metrics[kernel_metric(*key, "tflops")] = r["tflops"]
                    metrics[kernel_metric(*key, "frac_peak")] = r["frac_peak"]
        if kind == "check":
            metrics[CHECKS_FAILED] = sum(not r["passed"] for r in rows)
        run_id = self._create_run(f"kernels-{kind}-{time.strftime('%Y%m%d-%H%M%S')}", {KIND: run_kind, STATUS: RUNNING})
        self.log_params(run_id, {**facts, **params, KERNELS_KIND_PARAM: kind})
        self.log_metrics(run_id, metrics)
        self.client.log_text(run_id, table, KERNELS_ARTIFACT[run_kind])
        self.finish(run_id)
        return run_id

    # ------------------------------------------------------------ any run

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        items = _metric_batch(metrics, step)
        if items:
            self.client.log_batch(run_id, metrics=items)

    def log_artifact(self, run_id: str, path: str | Path) -> None:
        if Path(path).exists():
            self.client.log_artifact(run_id, str(path))

    def finish(self, run_id: str, error: str | None = None) -> None:
        self.set_tags(run_id, {STATUS: FAILED if error else FINISHED, **({ERROR: error[:5000]} if error else {})})
        self.client.set_terminated(run_id, status="FAILED" if error else "FINISHED")


class MetricsLogger:
    """Rank 0's training curves (``train/*``, ``val/*``, step = iteration) to the run the
    driver opened; a no-op without tracking (``tracking``: what ``train_run`` returned)."""

    def __init__(self, tracking: dict | None):
        self.client = self.run_id = None
        if tracking:
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(tracking["uri"]), tracking["run_id"]

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is not None:
            self.client.log_batch(self.run_id, metrics=_metric_batch(metrics, step))


def train_run(cfg: Config, run_dir: Path, tracking_uri: str | None, run_id: str | None, data_root: Path,
              train_fingerprint: dict, training_id: str) -> tuple[dict | None, bool]:
    """The MLflow run a training logs to: (``{"uri", "run_id"}`` for the workers, or None
    without tracking; whether this call owns the run and so ends it with ``end_train_run``).

    A given run id belongs to the caller (who logs its parameters and data); otherwise one run
    per run directory is created (and reopened on resume) with every config value as a
    parameter, its training identity and the training split it reads (``train_fingerprint``:
    its ``split_fingerprint`` record)."""
    if not (tracking_uri or run_id):
        return None, False
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    if run_id:
        return {"uri": uri, "run_id": run_id}, False
    tracker = Tracker(uri, run_dir)
    saved = run_dir / TRAIN_RUN_FILE
    if saved.is_file():
        run_id = saved.read_text().strip()
        tracker.client.update_run(run_id, status="RUNNING")
        tracker.set_tags(run_id, {STATUS: RUNNING, RESUMED: "true", **tracker._owner()})
    else:
        run_id = tracker.start_train(cfg)
        write_text(saved, run_id)
        tracker.set_tags(run_id, {TRAINING_ID: training_id})
        tracker.log_dataset(run_id, data_root, {"training": train_fingerprint}, context="training")
    return {"uri": uri, "run_id": run_id}, True


def end_train_run(tracking: dict, error: str | None, killed: bool = False, last_checkpoint: str | None = None) -> None:
    """Close the run ``train_run`` opened: finished, failed with ``error``, or killed (stopped
    by Ctrl-C) at ``last_checkpoint``."""
    if killed:
        Tracker(tracking["uri"]).kill(tracking["run_id"], last_checkpoint)
    else:
        Tracker(tracking["uri"]).finish(tracking["run_id"], error)
