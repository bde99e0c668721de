"""MLflow records of a reproduction: one parent run per ``reproduce``, one child run per
configuration, found again by the hash of its resolved config.

Names here are the contract with ``reports/``: experiment ``segrepro``; tags
``segrepro.kind`` (reproduce | config), ``segrepro.config``, ``segrepro.recipe``,
``segrepro.profile``, ``segrepro.config_hash``, ``segrepro.status`` (running | finished |
failed), ``segrepro.error``; metrics ``train/*``, ``val/mIoU``, ``ss/*``, ``msflip/*``,
``bench/*``, ``wall_time_s``, ``gpu_hours``. Only the driver (and training's rank 0) writes.

``segrepro eval`` logs one run per evaluation, tagged ``segrepro.kind=eval`` with
``segrepro.config``, ``segrepro.checkpoint`` (the path), ``segrepro.source`` (who produced the
weights), ``segrepro.protocol`` (whose evaluation rules), ``segrepro.mode`` (ss | msflip) and
``segrepro.status``; the flattened config and ``protocol.*`` as params; ``MODE/mIoU``,
``MODE/mAcc``, ``MODE/aAcc`` as metrics.
"""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.config import Config, InputError

EXPERIMENT = "segrepro"


def default_tracking_uri(run_dir: str | Path) -> str:
    """An SQLite store inside the run directory (MLflow 3.13+ refuses a ./mlruns file store)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> None:
    """Fail before any work starts if the store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                if resp.status != 200:
                    raise InputError(f"tracking URI {uri}: /health answered {resp.status}")
        except (urllib.error.URLError, OSError) as e:
            raise InputError(f"tracking URI {uri}: unreachable ({getattr(e, 'reason', e)})") from None
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    else:
        raise InputError(f"tracking URI {uri!r}: expected sqlite:///PATH or http(s)://HOST:PORT")


def init_tag(cfg: Config) -> str:
    """What the encoder started from, as the report shows it: 'TAG sha256:HEX' or 'scratch'."""
    m = cfg.model
    if m.init == "scratch" or not m.init_sha256:
        return "scratch"
    return f"{m.pretrained or m.backbone} sha256:{m.init_sha256}"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


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
            out[f"versions.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[f"versions.{pkg}"] = "absent"
    return out


class Tracker:
    """The driver's handle on the store; thread-safe (MlflowClient calls with explicit run ids)."""

    def __init__(self, uri: str, run_dir: str | Path):
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            # SQLite stores keep artifacts beside the database; a server decides for itself
            location = None if uri.startswith("http") else (Path(run_dir).resolve() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id

    def start_parent(self, argv: list[str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}",
                                     tags={"segrepro.kind": "reproduce", "segrepro.argv": " ".join(argv),
                                           "segrepro.git_commit": git_commit()})
        return run.info.run_id

    def finished_child(self, cfg: Config) -> str | None:
        runs = self._children(cfg, "finished")
        return runs[0].info.run_id if runs else None

    def _children(self, cfg: Config, status: str | None = None):
        flt = f"tags.`segrepro.config_hash` = '{cfg.config_hash()}' and tags.`segrepro.kind` = 'config'"
        if status:
            flt += f" and tags.`segrepro.status` = '{status}'"
        return self.client.search_runs([self.experiment_id], filter_string=flt,
                                       order_by=["attributes.start_time DESC"])

    def child_run(self, cfg: Config, parent_id: str, facts: dict) -> tuple[str, bool]:
        """The unfinished child of an interrupted reproduction of this config (so its curves
        continue), or a new one. Returns (run_id, resumed)."""
        runs = [r for r in self._children(cfg) if r.data.tags.get("segrepro.status") != "finished"]
        tags = {"segrepro.kind": "config", "segrepro.config": cfg.name, "segrepro.recipe": cfg.recipe,
                "segrepro.profile": cfg.profile, "segrepro.config_hash": cfg.config_hash(),
                "segrepro.status": "running", "mlflow.parentRunId": parent_id,
                "segrepro.init": init_tag(cfg)}
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            for k, v in tags.items():
                self.client.set_tag(run_id, k, v)
            self.client.set_tag(run_id, "segrepro.resumed", "true")
            return run_id, True
        run = self.client.create_run(self.experiment_id, run_name=cfg.name, tags=tags)
        params = {**flatten(cfg.to_dict()), "git_commit": git_commit(), **package_versions(),
                  **{f"device.{k}": v for k, v in facts.items()}}
        self.log_params(run.info.run_id, params)
        return run.info.run_id, False

    def log_eval(self, cfg: Config, record: dict) -> str:
        """One finished ``kind=eval`` run holding an evaluation's figures and its protocol."""
        protocol = record["protocol"]
        tags = {"segrepro.kind": "eval", "segrepro.config": cfg.name, "segrepro.recipe": cfg.recipe,
                "segrepro.checkpoint": record["checkpoint"], "segrepro.source": record["source"],
                "segrepro.protocol": protocol["name"], "segrepro.mode": protocol["mode"],
                "segrepro.config_hash": cfg.config_hash(), "segrepro.status": "finished"}
        run = self.client.create_run(self.experiment_id, run_name=f"eval-{cfg.name}-{protocol['name']}", tags=tags)
        run_id = run.info.run_id
        self.log_params(run_id, {**flatten(cfg.to_dict()), **flatten(protocol, "protocol."),
                                 "protocol.normalization_used": record["normalization"], "git_commit": git_commit(),
                                 **package_versions()})
        mode = protocol["mode"]
        self.log_metrics(run_id, {f"{mode}/{k}": record[k] for k in ("mIoU", "mAcc", "aAcc")}
                         | {f"{mode}/images": record["images"]})
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def log_artifact(self, run_id: str, path: str | Path) -> None:
        if Path(path).exists():
            self.client.log_artifact(run_id, str(path))

    def finish(self, run_id: str, error: str | None = None) -> None:
        self.client.set_tag(run_id, "segrepro.status", "failed" if error else "finished")
        if error:
            self.client.set_tag(run_id, "segrepro.error", error[:5000])
        self.client.set_terminated(run_id, status="FAILED" if error else "FINISHED")
