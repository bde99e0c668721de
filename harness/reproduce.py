"""``segrepro reproduce``: every configuration through train -> ss eval -> ms+flip eval ->
benchmark, each stage a Ray job or task with the resources it needs, configurations
concurrent as the cluster allows, everything recorded in MLflow, resumable at any point.

One process owns a run directory (``harness.lock``). A configuration's work lives in
``<run-dir>/configs/<name>-<training identity>/`` (``harness.identity``); each finished stage
leaves its result file there with the key it was computed for, so a restarted reproduction
reuses exactly the results that would come out the same (training continues from its newest
readable checkpoint) and recomputes the others. ``--force`` moves a configuration's old work
to ``<run-dir>/superseded/`` instead of deleting it. The first Ctrl-C stops the running stages
and marks the runs KILLED (``harness.interrupt``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness import contract, identity, interrupt, weights
from harness.atomic import write_json, write_text
from harness.config import Config, InputError, load_config, zoo_names
from harness.data import DataError
from harness.preflight import MEASURED_ITERATIONS, Target, require_cheap_checks, run_preflight
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


@dataclass
class Plan:
    """One configuration's work and the keys its results are found again by."""

    cfg: Config
    training_id: str
    run_key: str
    work: Path
    fingerprints: dict  # split -> split_fingerprint record
    protocols: dict  # "ss" | "msflip" -> the evaluation protocol as a dict
    bench: dict  # the benchmark settings
    device: str


def _last_checkpoint(work: Path) -> str | None:
    """The checkpoint a stopped configuration's training would resume from."""
    from harness.train.checkpoint import MODEL_FILE, newest
    from harness.train.driver import checkpoint_dirs

    saved = newest(checkpoint_dirs(work / "train"))
    return str(saved.path / MODEL_FILE) if saved else None


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
        resources); the configurations then carry their resolved weights and their keys."""
        self.check_arguments()
        require_cheap_checks(self.target())
        self._resolve_weights()
        self._plan()

    def _resolve_weights(self) -> None:
        """Every configuration's ImageNet checkpoint found (or its from-scratch fallback decided)
        before any work; the resolved configs carry the file's SHA-256."""
        resolved = weights.resolve_all(self.cfgs, self.opts.backbone_dir, self.opts.from_scratch)
        self.cfgs = [r.cfg for r in resolved]
        self.backbones = {r.cfg.name: r.file.path if r.file else None for r in resolved}
        self.init_notes = {r.cfg.name: r.note for r in resolved}

    def _plan(self) -> None:
        from harness.data.fingerprint import split_fingerprint
        from harness.evaluate import Protocol
        from kernels.device import device_facts

        self.facts = device_facts()
        device = self._bench_device()
        fps = {split: split_fingerprint(self.opts.data_root, split) for split in ("training", "validation")}
        self.plans = []
        for cfg in self.cfgs:
            tid = identity.training_id(cfg, fps["training"]["fingerprint"])
            protocols = {mode: dataclasses.asdict(Protocol.of(cfg, mode == "msflip")) for mode in ("ss", "msflip")}
            bench = identity.bench_settings(cfg, self.opts.workers)
            key = identity.run_key(tid, list(protocols.values()), fps["validation"]["fingerprint"], bench, device)
            self.plans.append(Plan(cfg, tid, key, self.opts.run_dir / "configs" / f"{cfg.name}-{tid}", fps,
                                   protocols, bench, device))

    def _bench_device(self) -> str:
        """What the benchmark stage will run on: the cluster's GPU type, else this CPU's model."""
        import ray

        gpus = sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))
        if ray.cluster_resources().get("GPU", 0) > 0:
            return "GPU " + ",".join(gpus or ["unknown"])
        return f"CPU {self.facts.get('cpu_model', 'unknown')}"

    def run(self) -> list[dict]:
        self.tracker = Tracker(self.uri, self.opts.run_dir)
        # the caller holds the run directory's lock: a RUNNING run recorded for it is a dead process's
        for run_id in self.tracker.close_stale(self.opts.run_dir):
            print(f"segrepro: run {run_id} of a process that died was marked KILLED", file=sys.stderr)
        self.parent = self.tracker.start_parent(self.opts.argv)
        self.board = StatusBoard([c.name for c in self.cfgs])
        with interrupt.handling_sigint():
            with ThreadPoolExecutor(max_workers=len(self.plans)) as pool:
                futures = [pool.submit(self._run_one, p) for p in self.plans]
                outcomes = [f.result() for f in futures]
        if interrupt.requested():
            self.tracker.kill(self.parent, None)
            raise interrupt.Interrupted(_resume_hint(self.opts))
        failed = [o for o in outcomes if o["status"] == "failed"]
        self.tracker.finish(self.parent, f"{len(failed)} configuration(s) failed" if failed else None)
        return outcomes

    def _move_aside(self, work: Path) -> None:
        """--force: the configuration's earlier work is kept under superseded/, not deleted."""
        if work.exists():
            dest = self.opts.run_dir / "superseded" / f"{work.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(work, dest)
            self.board.update(work.name.rsplit("-", 1)[0], f"--force: earlier work moved to {dest}")

    def _run_one(self, plan: Plan) -> dict:
        cfg, work, name = plan.cfg, plan.work, plan.cfg.name
        if not self.opts.force:
            done = self.tracker.finished_child(name, plan.run_key)
            if done:
                self.board.update(name, f"skipped: finished run {done} has the same training, data and protocols")
                return {"config": name, "status": "skipped", "run_id": done}
        else:
            self._move_aside(work)
        work.mkdir(parents=True, exist_ok=True)
        write_text(work / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        keys = {contract.TRAINING_ID: plan.training_id, contract.RUN_KEY: plan.run_key}
        run_id, resumed = self.tracker.child_run(cfg, self.parent, self.facts, keys)
        log = (work / "log.txt").open("a")

        def note(text: str) -> None:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            log.flush()
            self.board.update(name, text)

        try:
            self.tracker.log_dataset(run_id, self.opts.data_root,
                                     {split: fp["fingerprint"] for split, fp in plan.fingerprints.items()},
                                     context="training")
            note(f"{'resumed' if resumed else 'started'} (MLflow run {run_id}); encoder init: "
                 f"{self.init_notes[name]}; precision {cfg.optim.amp}; training identity {plan.training_id}")
            interrupt.check()
            train = self._train(plan, run_id, note)
            checkpoint = train["checkpoint"]
            sha = weights.sha256_file(Path(checkpoint))
            results = {}
            for mode in ("ss", "msflip"):
                interrupt.check()
                results[mode] = self._eval(plan, checkpoint, sha, mode, note)
            interrupt.check()
            bench = self._bench(plan, checkpoint, note)
            self._log_results(run_id, plan, train, sha, results["ss"], results["msflip"], bench)
            note(f"finished: ss mIoU {results['ss']['mIoU']:.2f}, ms+flip mIoU {results['msflip']['mIoU']:.2f}, "
                 f"{bench['inference']['images_per_s']:.2f} img/s, training {bench['train']['images_per_s']:.2f} img/s")
            log.close()
            self.tracker.log_artifact(run_id, work / "log.txt")
            self.tracker.finish(run_id)
            return {"config": name, "status": "finished", "run_id": run_id, "ss": results["ss"]["mIoU"],
                    "msflip": results["msflip"]["mIoU"]}
        except Exception as e:  # one configuration failing must not stop the others
            killed = isinstance(e, interrupt.Interrupted) or (
                not isinstance(e, (InputError, DataError)) and interrupt.wait(2))
            if killed:
                last = _last_checkpoint(work)
                note(f"killed: interrupted; last checkpoint {last or 'none'}")
                log.close()
                self.tracker.kill(run_id, last)
                return {"config": name, "status": "killed", "run_id": run_id, "last_checkpoint": last}
            note(f"failed: {type(e).__name__}: {e}")
            log.write(traceback.format_exc())
            log.close()
            self.tracker.log_artifact(run_id, work / "log.txt")
            self.tracker.finish(run_id, f"{type(e).__name__}: {e}")
            return {"config": name, "status": "failed", "run_id": run_id, "error": str(e)}

    def _train(self, plan: Plan, run_id: str, note) -> dict:
        from harness.train.driver import finished_result, train

        cfg = plan.cfg
        done = finished_result(plan.work / "train", cfg, self.opts.data_root)
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

        return train(cfg, self.opts.data_root, plan.work / "train", workers=self.opts.workers,
                     gpus_per_worker=self.opts.gpus_per_worker, address=self.opts.address, resume=True,
                     backbone_weights=self.backbones[cfg.name], tracking_uri=self.uri, mlflow_run_id=run_id,
                     progress_callback=progress)

    def _eval(self, plan: Plan, checkpoint: str, sha: str, mode: str, note) -> dict:
        """The evaluation result for exactly this checkpoint, protocol and validation split."""
        from harness.stages import run_eval

        key = identity.eval_key(plan.training_id, sha, plan.protocols[mode],
                                plan.fingerprints["validation"]["fingerprint"])
        path = plan.work / f"{mode}_metrics.json"
        done = _read_json(path)
        if done and done.get("key") == key:
            return done
        note(f"eval {'ms+flip' if mode == 'msflip' else 'ss'}: running")
        result = run_eval(checkpoint, plan.cfg, str(self.opts.data_root), mode == "msflip", str(plan.work))
        result = {**result, "key": key, "checkpoint_sha256": sha}
        write_json(path, result)
        return result

    def _bench(self, plan: Plan, checkpoint: str, note) -> dict:
        from harness.stages import run_bench

        key = identity.bench_key(plan.training_id, plan.bench, plan.device)
        path = plan.work / "bench.json"
        done = _read_json(path)
        if done and done.get("key") == key:
            return done
        note("bench: waiting for its node to be free, then running alone")
        result = {**run_bench(plan.cfg, checkpoint, self.opts.workers), "key": key}
        write_json(path, result)
        return result

    def _log_results(self, run_id: str, plan: Plan, train: dict, sha: str, ss: dict, ms: dict, bench: dict) -> None:
        t = self.tracker
        metrics = {}
        for prefix, rec in (("ss", ss), ("msflip", ms)):
            metrics.update({f"{prefix}/{k}": rec[k] for k in ("mIoU", "mAcc", "aAcc")})
            metrics[f"{prefix}/seconds"] = rec["seconds"]
        for k in ("images_per_s", "latency_median_ms", "latency_p90_ms", "slide_latency_median_ms", "gflops",
                  "params_m", "peak_memory_mb"):
            metrics[f"bench/{k}"] = bench["inference"][k]
        metrics.update({contract.metric(contract.BENCH_TRAIN, k): bench["train"][k]
                        for k in contract.BENCH_TRAIN_FIGURES})
        # every attempt's training time (the driver's ledger) plus the evaluations'
        metrics["wall_time_s"] = train["wall_time_s"] + ss["seconds"] + ms["seconds"]
        gpus = self.opts.workers * self.opts.gpus_per_worker
        metrics["gpu_hours"] = train["wall_time_s"] * gpus / 3600
        t.log_final_metrics(run_id, metrics)
        proto = bench["inference"]["protocol"]
        params = {f"bench.{k}": proto[k] for k in ("batch_size", "precision", "image_size", "device", "threads",
                                                  "concurrent_load")}
        proto = bench["train"]["protocol"]
        params.update({contract.BENCH_TRAIN_PREFIX + k: proto[k]
                       for k in ("crop", "batch_size", "precision", "device", "threads", "peak_memory_kind")})
        params.update({"train.checkpoint": train["checkpoint"], "train.checkpoint_sha256": sha,
                       "train.attempts": train.get("attempts", 1)})
        existing = t.client.get_run(run_id).data.params
        t.log_params(run_id, {k: v for k, v in params.items() if k not in existing})
        for f in ("config.yaml", "ss_metrics.json", "ss_per_class.csv", "msflip_metrics.json",
                  "msflip_per_class.csv", "bench.json"):
            t.log_artifact(run_id, plan.work / f)


def _resume_hint(opts: Options) -> str:
    argv = " ".join(opts.argv) if opts.argv else f"reproduce --run-dir {opts.run_dir}"
    return f"interrupted; every finished stage is kept: rerun `segrepro {argv}` to resume"


def reproduce(opts: Options) -> tuple[list[dict], str]:
    """Run the reproduction; the caller holds ``opts.run_dir``'s lock (``harness.lock.RunLock``)."""
    rep = Reproduction(opts)
    rep.validate()
    return rep.run(), rep.uri


def preflight(opts: Options, iterations: int = MEASURED_ITERATIONS, progress: bool = True) -> dict:
    """``reproduce --preflight``: the arguments, then every check and measurement (no work)."""
    rep = Reproduction(opts)
    rep.check_arguments()
    return run_preflight(rep.target(), iterations, progress)
