"""``segrepro reproduce``: every configuration through train -> ss eval -> ms+flip eval ->
benchmark, each stage a Ray job or task with the resources it needs, configurations
concurrent as the cluster allows, everything recorded in MLflow, resumable at any point.

A configuration's work lives in ``<run-dir>/configs/<name>-<config hash>/``; each finished
stage leaves its result file there, so a restarted reproduction skips finished stages and
training continues from its last checkpoint.
"""
from __future__ import annotations

import json
import shutil
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness import weights
from harness.atomic import write_json
from harness.config import Config, InputError, load_config, zoo_names
from harness.preflight import MEASURED_ITERATIONS, Target, require_cheap_checks, run_preflight, stage_resources
from harness.tracking import Tracker, default_tracking_uri

SEED_CONFIGS = ("seg_tiny_mask", "seg_small_mask", "seg_base_mask", "seg_base_deit_linear", "seg_base_deit_mask")
STAGES = ("train", "eval ss", "eval ms+flip", "bench")


@dataclass
class Options:
    configs: list[str]
    data_root: Path
    run_dir: Path
    profile: str | None = None
    recipe: str | None = None
    address: str | None = None
    tracking_uri: str | None = None
    force: bool = False
    workers: int = 1
    gpus_per_worker: float = 0
    backbone_dir: Path | None = None
    from_scratch: bool = False
    amp: str | None = None  # training precision override; None: the recipe's
    argv: list[str] = field(default_factory=list)


def resolve_configs(spec: str) -> list[str]:
    if spec == "all":
        return zoo_names()
    if spec == "seed":
        return list(SEED_CONFIGS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise InputError(f"--configs {spec!r}: expected all, seed, or a comma-separated list of configurations")
    return names


class StatusBoard:
    """One line per configuration with its stage and progress: redrawn in place on a
    terminal, printed on change elsewhere (logs, CI)."""

    def __init__(self, names: list[str], stream=sys.stderr):
        self.names = names
        self.lines = {n: "waiting" for n in names}
        self.stream = stream
        self.tty = stream.isatty()
        self.lock = threading.Lock()
        self.width = max(len(n) for n in names)
        self.drawn = False

    def update(self, name: str, text: str) -> None:
        with self.lock:
            if self.lines[name] == text:
                return
            self.lines[name] = text
            if self.tty:
                if self.drawn:
                    self.stream.write(f"\x1b[{len(self.names)}F")
                for n in self.names:
                    self.stream.write(f"\x1b[2K{n:<{self.width}}  {self.lines[n]}\n")
                self.drawn = True
            else:
                self.stream.write(f"{name:<{self.width}}  {text}\n")
            self.stream.flush()


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _eval_stage(checkpoint: str, cfg: Config, data_root: str, ms_flip: bool, out_dir: str) -> dict:
    from harness.evaluate import run_eval

    return run_eval(checkpoint, cfg, data_root, ms_flip, None, 1, out_dir, progress=False)


def _bench_stage(cfg: Config, checkpoint: str) -> dict:
    from harness.benchmark import benchmark

    b = cfg.bench
    return benchmark(cfg, checkpoint, b.batch_size, None, b.precision, None, b.warmup, b.repeats)


class Reproduction:
    def __init__(self, opts: Options):
        self.opts = opts
        self.uri = opts.tracking_uri or default_tracking_uri(opts.run_dir)
        self.cfgs: list[Config] = []

    def check_arguments(self) -> None:
        """The configurations resolve and the arguments fit them."""
        overrides = {"optim": {"amp": self.opts.amp}} if self.opts.amp else None
        self.cfgs = [load_config(n, recipe=self.opts.recipe, profile=self.opts.profile, overrides=overrides)
                     for n in self.opts.configs]
        for cfg in self.cfgs:
            if cfg.optim.batch_size % self.opts.workers:
                raise InputError(f"--workers {self.opts.workers}: must divide {cfg.name}'s global batch "
                                 f"{cfg.optim.batch_size}")

    def target(self) -> Target:
        o = self.opts
        return Target(self.cfgs, o.data_root, o.run_dir, self.uri, o.address, o.workers, o.gpus_per_worker,
                      o.backbone_dir, o.from_scratch)

    def validate(self) -> None:
        """Every input checked before any work starts: the arguments, then the cheap preflight
        checks (weights, data layout, store, cluster, run directory seen from every node,
        resources); the configurations then carry their resolved weights."""
        self.check_arguments()
        require_cheap_checks(self.target())
        self._resolve_weights()

    def run(self) -> list[dict]:
        from kernels.device import device_facts

        self.tracker = Tracker(self.uri, self.opts.run_dir)
        self.facts = device_facts()
        self.parent = self.tracker.start_parent(self.opts.argv)
        self.board = StatusBoard([c.name for c in self.cfgs])
        with ThreadPoolExecutor(max_workers=len(self.cfgs)) as pool:
            outcomes = list(pool.map(self._run_one, self.cfgs))
        failed = [o for o in outcomes if o["status"] == "failed"]
        self.tracker.finish(self.parent, f"{len(failed)} configuration(s) failed" if failed else None)
        return outcomes

    def _resolve_weights(self) -> None:
        """Every configuration's ImageNet checkpoint found (or its from-scratch fallback decided)
        before any work; the resolved configs carry the file's SHA-256."""
        resolved = weights.resolve_all(self.cfgs, self.opts.backbone_dir, self.opts.from_scratch)
        self.cfgs = [r.cfg for r in resolved]
        self.backbones = {r.cfg.name: r.file.path if r.file else None for r in resolved}
        self.init_notes = {r.cfg.name: r.note for r in resolved}

    def _run_one(self, cfg: Config) -> dict:
        name = cfg.name
        work = self.opts.run_dir / "configs" / f"{name}-{cfg.config_hash()}"
        if not self.opts.force:
            done = self.tracker.finished_child(cfg)
            if done:
                self.board.update(name, f"skipped: finished run {done} has the same config hash")
                return {"config": name, "status": "skipped", "run_id": done}
        elif work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        run_id, resumed = self.tracker.child_run(cfg, self.parent, self.facts)
        log = (work / "log.txt").open("a")

        def note(text: str) -> None:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            log.flush()
            self.board.update(name, text)

        try:
            note(f"{'resumed' if resumed else 'started'} (MLflow run {run_id}); encoder init: "
                 f"{self.init_notes[name]}; precision {cfg.optim.amp}")
            train = self._train(cfg, work, run_id, note)
            ss = self._eval(cfg, work, train["checkpoint"], False, note)
            ms = self._eval(cfg, work, train["checkpoint"], True, note)
            bench = self._bench(cfg, work, train["checkpoint"], note)
            self._log_results(run_id, cfg, work, train, ss, ms, bench)
            note(f"finished: ss mIoU {ss['mIoU']:.2f}, ms+flip mIoU {ms['mIoU']:.2f}, "
                 f"{bench['images_per_s']:.2f} img/s")
            log.close()
            self.tracker.log_artifact(run_id, work / "log.txt")
            self.tracker.finish(run_id)
            return {"config": name, "status": "finished", "run_id": run_id, "ss": ss["mIoU"], "msflip": ms["mIoU"]}
        except Exception as e:  # one configuration failing must not stop the others
            note(f"failed: {type(e).__name__}: {e}")
            log.write(traceback.format_exc())
            log.close()
            self.tracker.log_artifact(run_id, work / "log.txt")
            self.tracker.finish(run_id, f"{type(e).__name__}: {e}")
            return {"config": name, "status": "failed", "run_id": run_id, "error": str(e)}

    def _train(self, cfg: Config, work: Path, run_id: str, note) -> dict:
        from harness.train.driver import finished_result, train

        done = finished_result(work / "train", cfg, self.opts.data_root)
        if done:
            note("train: finished earlier")
            return done
        note("train: starting")

        def progress(rec: dict) -> None:
            eta = rec.get("eta_s")
            text = f"train {rec.get('iteration')}/{rec.get('total')}"
            if rec.get("loss") is not None:
                text += f" loss {rec['loss']:.3f}"
            if eta is not None:
                text += f" eta {int(eta) // 60}m{int(eta) % 60:02d}s"
            if rec.get("val/mIoU") is not None:
                text += f" val mIoU {rec['val/mIoU']:.2f}"
            self.board.update(cfg.name, text)

        return train(cfg, self.opts.data_root, work / "train", workers=self.opts.workers,
                     gpus_per_worker=self.opts.gpus_per_worker, address=self.opts.address, resume=True,
                     backbone_weights=self.backbones[cfg.name], tracking_uri=self.uri, mlflow_run_id=run_id,
                     progress_callback=progress)

    def _resources(self) -> dict:
        import ray

        ask = stage_resources(self.opts.workers, self.opts.gpus_per_worker,
                              ray.cluster_resources().get("GPU", 0))["eval/bench"]
        return {"num_cpus": ask["CPU"], "num_gpus": ask["GPU"]}

    def _eval(self, cfg: Config, work: Path, checkpoint: str, ms_flip: bool, note) -> dict:
        import ray

        mode = "msflip" if ms_flip else "ss"
        done = _read_json(work / f"{mode}_metrics.json")
        if done:
            return done
        note(f"eval {'ms+flip' if ms_flip else 'ss'}: running")
        task = ray.remote(**self._resources())(_eval_stage)
        return ray.get(task.remote(checkpoint, cfg, str(self.opts.data_root), ms_flip, str(work)))

    def _bench(self, cfg: Config, work: Path, checkpoint: str, note) -> dict:
        import ray

        done = _read_json(work / "bench.json")
        if done:
            return done
        note("bench: running")
        task = ray.remote(**self._resources())(_bench_stage)
        result = ray.get(task.remote(cfg, checkpoint))
        write_json(work / "bench.json", result)
        return result

    def _log_results(self, run_id: str, cfg: Config, work: Path, train: dict, ss: dict, ms: dict, bench: dict) -> None:
        t = self.tracker
        metrics = {}
        for prefix, rec in (("ss", ss), ("msflip", ms)):
            metrics.update({f"{prefix}/{k}": rec[k] for k in ("mIoU", "mAcc", "aAcc")})
            metrics[f"{prefix}/seconds"] = rec["seconds"]
        for k in ("images_per_s", "latency_median_ms", "latency_p90_ms", "slide_latency_median_ms", "gflops",
                  "params_m", "peak_memory_mb"):
            metrics[f"bench/{k}"] = bench[k]
        wall = train["wall_time_s"] + ss["seconds"] + ms["seconds"]
        metrics["wall_time_s"] = wall
        gpus = self.opts.workers * self.opts.gpus_per_worker
        metrics["gpu_hours"] = train["wall_time_s"] * gpus / 3600
        t.log_metrics(run_id, metrics)
        proto = bench["protocol"]
        params = {f"bench.{k}": proto[k] for k in ("batch_size", "precision", "image_size", "device")}
        params["train.checkpoint"] = train["checkpoint"]
        existing = t.client.get_run(run_id).data.params
        t.log_params(run_id, {k: v for k, v in params.items() if k not in existing})
        for f in ("config.yaml", "ss_metrics.json", "ss_per_class.csv", "msflip_metrics.json",
                  "msflip_per_class.csv", "bench.json"):
            t.log_artifact(run_id, work / f)


def reproduce(opts: Options) -> tuple[list[dict], str]:
    rep = Reproduction(opts)
    rep.validate()
    return rep.run(), rep.uri


def preflight(opts: Options, iterations: int = MEASURED_ITERATIONS, progress: bool = True) -> dict:
    """``reproduce --preflight``: the arguments, then every check and measurement (no work)."""
    rep = Reproduction(opts)
    rep.check_arguments()
    return run_preflight(rep.target(), iterations, progress)
