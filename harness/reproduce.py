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
import logging
import os
import shutil
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness import contract, identity, interrupt, runs, weights
from harness.atomic import write_json, write_text
from harness.config import Config, InputError, load_config, zoo_names
from harness.data.ade20k import DataError
from harness.preflight import MEASURED_ITERATIONS, Target, require_cheap_checks, run_preflight
from harness.progress import PROGRESS_FILE, eta_s, format_duration, read_progress, stage_token
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
    given = [n.strip() for n in spec.split(",") if n.strip()]
    if not given:
        raise InputError(f"--configs {spec!r}: expected all, seed, or a comma-separated list of configurations")
    names = list(dict.fromkeys(given))  # one run directory holds one run of each configuration
    if len(names) < len(given):
        twice = sorted({n for n in given if given.count(n) > 1})
        print(f"segrepro: note: --configs names {', '.join(twice)} more than once; each runs once", file=sys.stderr)
    return names


class _Row:
    """One configuration's line: a note, or a stage with its count since ``since``."""

    def __init__(self):
        self.text, self.stage, self.since = "waiting", None, 0.0
        self.done = self.total = None
        self.base, self.unit, self.extra = 0, "", ""
        self.progress: tuple[Path, str] | None = None  # the stage's progress file and token
        self.printed = 0.0  # when its progress was last printed (not on a terminal)


class _Through:
    """sys.stdout / sys.stderr while the board is on a terminal: text goes above the board."""

    def __init__(self, board: "StatusBoard", target):
        self._board, self._target = board, target

    def write(self, text: str) -> int:
        self._board.write_above(self._target, text)
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def __getattr__(self, name):
        return getattr(self._target, name)


class StatusBoard:
    """One line per configuration: its stage with count, ETA (from the stage's start, start-up
    included) and time in the stage, or its last note.

    On a terminal the board is redrawn in place every second, each line cut to the terminal's
    width so it takes one row; anything written meanwhile to sys.stdout or sys.stderr (a
    warning, a logging handler's message) goes above it: the board is erased, the text written,
    and the board drawn again below it, so no line is overwritten. Elsewhere (logs, CI) a line
    is printed when a configuration's stage or note changes, and its progress at most every
    ``PRINT_INTERVAL_S``. Progress files of stages running as Ray tasks are polled every second.
    """

    PRINT_INTERVAL_S = 10.0

    def __init__(self, names: list[str], stream=None):
        self.names = names
        self.rows = {n: _Row() for n in names}
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.lock = threading.RLock()
        self.width = max(len(n) for n in names)
        self.drawn = 0  # rows of the board on the screen now
        self.partial = False  # a line written above the board is not finished yet
        self.stop = threading.Event()

    # ---------------------------------------------------------------- state
    def update(self, name: str, text: str) -> None:
        """A note: the configuration's line until its next stage or note."""
        with self.lock:
            row = self.rows[name]
            if row.stage is None and row.text == text:
                return
            row.text, row.stage, row.progress = text, None, None
            self._changed(name, True)

    def start(self, name: str, stage: str, text: str = "", progress: tuple[Path, str] | None = None,
              base: int = 0) -> None:
        """``stage`` begins now; ``progress`` (file, token) is polled for its count; ``base``: the
        count it starts from (a resumed training's iteration)."""
        with self.lock:
            row = self.rows[name]
            row.stage, row.text, row.since, row.progress, row.base = stage, text, time.monotonic(), progress, base
            row.done = row.total = None
            row.extra = ""
            self._changed(name, True)

    def progress(self, name: str, done: int, total: int, unit: str, extra: str = "") -> None:
        with self.lock:
            row = self.rows[name]
            if (row.done, row.total, row.extra) == (done, total, extra):
                return
            row.done, row.total, row.unit, row.extra = done, total, unit, extra
            self._changed(name, False)

    def poll(self) -> None:
        """The count of every stage that reports through a progress file."""
        for name, row in list(self.rows.items()):
            if row.progress:
                record = read_progress(*row.progress)
                if record and row.stage is not None:
                    self.progress(name, record["done"], record["total"], record["unit"])

    def line(self, name: str) -> str:
        row = self.rows[name]
        if row.stage is None:
            return row.text
        elapsed = time.monotonic() - row.since
        parts = [row.stage]
        if row.total:
            parts[0] += f" {row.done}/{row.total} {row.unit}"
            eta = eta_s(elapsed, row.done - row.base, row.total - row.base)
            parts += [row.extra] if row.extra else []
            parts += [f"eta {format_duration(eta)}"] if eta is not None else []
        elif row.text:
            parts[0] += f": {row.text}"
        return "  ".join(parts + [f"elapsed {format_duration(elapsed)}"])

    # ---------------------------------------------------------------- output
    def _changed(self, name: str, stage_or_note: bool) -> None:
        if self.tty:
            self._redraw()
            return
        row, now = self.rows[name], time.monotonic()
        if not stage_or_note:
            if row.done != row.total and now - row.printed < self.PRINT_INTERVAL_S:
                return
            row.printed = now
        else:
            row.printed = 0.0  # a stage's first count prints at once
        self.stream.write(f"{name:<{self.width}}  {self.line(name)}\n")
        self.stream.flush()

    def _erase(self) -> None:
        if self.drawn:
            # to the board's first row, then clear to the end of the screen
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _draw(self) -> None:
        columns = shutil.get_terminal_size().columns
        for n in self.names:
            self.stream.write(f"{n:<{self.width}}  {self.line(n)}"[:columns - 1] + "\n")
        self.drawn = len(self.names)

    def _redraw(self) -> None:
        with self.lock:
            if self.partial:
                return
            self._erase()
            self._draw()
            self.stream.flush()

    def write_above(self, target, text: str) -> None:
        """``text`` written to ``target`` above the board (``_Through``)."""
        if not text:
            return
        with self.lock:
            if not self.partial:
                self._erase()
                self.stream.flush()
            target.write(text)
            target.flush()
            self.partial = not text.endswith("\n")
            if not self.partial:
                self._draw()
                self.stream.flush()

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            self.poll()
            if self.tty:
                self._redraw()

    def __enter__(self) -> "StatusBoard":
        self.saved = sys.stdout, sys.stderr
        self.handlers = []
        if self.tty:
            through = {id(s): _Through(self, s) for s in self.saved}
            sys.stdout, sys.stderr = (through[id(s)] for s in self.saved)
            # logging handlers made earlier hold the streams themselves
            for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
                for h in getattr(logger, "handlers", []):
                    if type(h) is logging.StreamHandler and id(h.stream) in through:
                        self.handlers.append((h, h.stream))
                        h.setStream(through[id(h.stream)])
        self.ticker = threading.Thread(target=self._tick, daemon=True)
        self.ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.ticker.join()
        for h, stream in self.handlers:
            h.setStream(stream)
        sys.stdout, sys.stderr = self.saved
        if self.tty:
            with self.lock:
                self.partial = False
                self._redraw()


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


def _saved_iteration(train_dir: Path) -> int:
    """The iteration of the newest checkpoint in ``train_dir`` (where training will resume, unless
    that one is unusable): the count the training stage's ETA starts from."""
    from harness.train.checkpoint import STATE_FILE
    from harness.train.driver import checkpoint_dirs

    states = [_read_json(d / STATE_FILE) or {} for d in checkpoint_dirs(train_dir)]
    return max((s.get("iteration", 0) for s in states), default=0)


def _last_checkpoint(work: Path) -> str | None:
    """The checkpoint a stopped configuration's training would resume from."""
    from harness.train.checkpoint import MODEL_FILE, newest
    from harness.train.driver import checkpoint_dirs

    saved = newest(checkpoint_dirs(work / runs.TRAIN_DIR))
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
        if self.opts.workers < 1:
            raise InputError(f"--workers {self.opts.workers}: must be at least 1")
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
        # the parent row of MLflow's run list shows its own inputs ("Dataset: -" without them)
        self.tracker.log_dataset(self.parent, self.opts.data_root,
                                 {split: fp["fingerprint"] for split, fp in self.plans[0].fingerprints.items()},
                                 context="training")
        self.board = StatusBoard([c.name for c in self.cfgs])
        with interrupt.handling_sigint(), self.board:
            with ThreadPoolExecutor(max_workers=len(self.plans)) as pool:
                futures = [pool.submit(self._run_one, p) for p in self.plans]
                outcomes = [{**f.result(), "work_dir": str(p.work)} for p, f in zip(self.plans, futures)]
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
        write_text(work / runs.CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        keys = {contract.TRAINING_ID: plan.training_id, contract.RUN_KEY: plan.run_key}
        run_id, resumed = self.tracker.child_run(cfg, self.parent, self.facts, keys)
        log = (work / runs.LOG_FILE).open("a")

        def note(text: str, stage: str | None = None, **start) -> None:
            """One line in the log; on the board a note, or with ``stage`` that stage's start."""
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {stage + ': ' if stage else ''}{text}\n")
            log.flush()
            if stage:
                self.board.start(name, stage, text, **start)
            else:
                self.board.update(name, text)

        try:
            self.tracker.log_dataset(run_id, self.opts.data_root, plan.fingerprints, context="training")
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
            self.tracker.log_artifact(run_id, work / runs.LOG_FILE)
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
            self.tracker.log_artifact(run_id, work / runs.LOG_FILE)
            self.tracker.finish(run_id, f"{type(e).__name__}: {e}")
            return {"config": name, "status": "failed", "run_id": run_id, "error": str(e),
                    "user_error": isinstance(e, InputError), "log": str(work / "log.txt")}

    def _train(self, plan: Plan, run_id: str, note) -> dict:
        from harness.train.driver import finished_result, train

        cfg = plan.cfg
        done = finished_result(plan.work / runs.TRAIN_DIR, cfg, self.opts.data_root)
        if done:
            note("train: finished earlier")
            return done
        saved = _saved_iteration(plan.work / runs.TRAIN_DIR)
        note(f"starting (Ray Train workers){f', resuming from iteration {saved}' if saved else ''}", "train",
             base=saved)

        def progress(rec: dict) -> None:
            extra = [f"loss {rec['loss']:.3f}"] if rec.get("loss") is not None else []
            extra += [f"val mIoU {rec['val/mIoU']:.2f}"] if rec.get("val/mIoU") is not None else []
            self.board.progress(cfg.name, rec["iteration"], rec["total"], "it", "  ".join(extra))

        return train(cfg, self.opts.data_root, plan.work / runs.TRAIN_DIR, workers=self.opts.workers,
                     gpus_per_worker=self.opts.gpus_per_worker, address=self.opts.address, resume=True,
                     backbone_weights=self.backbones[cfg.name], tracking_uri=self.uri, mlflow_run_id=run_id,
                     progress_callback=progress)

    def _eval(self, plan: Plan, checkpoint: str, sha: str, mode: str, note) -> dict:
        """The evaluation result for exactly this checkpoint, protocol and validation split."""
        from harness.stages import run_eval

        key = identity.eval_key(plan.training_id, sha, plan.protocols[mode],
                                plan.fingerprints["validation"]["fingerprint"])
        path = plan.work / runs.metrics_file(mode)
        done = _read_json(path)
        if done and done.get("key") == key:
            return done
        stage = runs.STAGE_NAMES[mode]
        progress = (str(plan.work / PROGRESS_FILE), stage_token(stage))
        note("starting", stage, progress=progress)
        result = run_eval(checkpoint, plan.cfg, str(self.opts.data_root), mode == "msflip", str(plan.work),
                          progress)
        self.board.poll()  # its last count, whether or not the board polled it while it ran
        result = {**result, "key": key, "checkpoint_sha256": sha}
        write_json(path, result)
        return result

    def _bench(self, plan: Plan, checkpoint: str, note) -> dict:
        from harness.stages import run_bench

        key = identity.bench_key(plan.training_id, plan.bench, plan.device)
        path = plan.work / runs.BENCH_FILE
        done = _read_json(path)
        if done and done.get("key") == key:
            return done
        progress = (str(plan.work / PROGRESS_FILE), stage_token("bench"))
        note("waiting for its node to be free, then running alone", "bench", progress=progress)
        result = {**run_bench(plan.cfg, checkpoint, self.opts.workers, progress), "key": key}
        self.board.poll()
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
    """Run the reproduction; the caller holds ``opts.run_dir``'s lock (``harness.lock.RunLock``).
    Each outcome carries its configuration's ``work_dir``, ``checkpoint`` and result ``files``."""
    rep = Reproduction(opts)
    rep.validate()
    outcomes = []
    for o in rep.run():
        found = runs.describe(Path(o["work_dir"]))
        outcomes.append({**o, "checkpoint": found["checkpoint"], "files": found["files"]})
    return outcomes, rep.uri


def format_outcomes(outcomes: list[dict]) -> str:
    """Per configuration: its outcome and figures, then where its work, checkpoint and results are."""
    lines = []
    for o in outcomes:
        found = runs.describe(Path(o["work_dir"]))
        figures = ", ".join(f"{label} {found[key]:.2f}" for key, label in (
            ("ss_mIoU", "ss mIoU"), ("msflip_mIoU", "ms+flip mIoU"), ("images_per_s", "img/s"),
            ("train_images_per_s", "training img/s"))
            if found[key] is not None)
        lines.append(f"{o['config']}: {o['status']}" + (f", {figures}" if figures else "")
                     + (f" ({o['error']})" if o.get("error") else ""))
        lines.append(f"  run dir     {o['work_dir']}")
        lines.append(f"  checkpoint  {found['checkpoint'] or 'none'}")
        if found["files"]:
            lines.append(f"  results     {', '.join(v for k, v in found['files'].items() if k != 'log')}")
    return "\n".join(lines)


def preflight(opts: Options, iterations: int = MEASURED_ITERATIONS, progress: bool = True) -> dict:
    """``reproduce --preflight``: the arguments, then every check and measurement (no work)."""
    rep = Reproduction(opts)
    rep.check_arguments()
    return run_preflight(rep.target(), iterations, progress)
