"""Preflight of a reproduction: everything a long run needs, checked before it is booked, and
what it will cost.

Checks, in order (``CHEAP`` ones also run at the start of every ``reproduce``, which stops at
the first failure; ``reproduce --preflight`` runs them all and reports each):

- ``weights``: every configuration's ImageNet checkpoint is found (``harness.weights``), or
  the run may train from scratch (``--from-scratch``, the smoke profile);
- ``data layout``: both splits exist and every image has its label;
- ``data full check``: every image decodes, every label has the image's size and ADE20K values
  (``harness.data.check``); a pass is cached under ``cache_dir()`` keyed by the dataset
  fingerprint, so an unchanged dataset is not decoded again (preflight only);
- ``tracking``: the MLflow store answers a query;
- ``ray``: the cluster answers;
- ``run directory``: writable here and visible from every alive Ray node (one probe task each);
- ``resources``: the cluster has what each stage asks for (``harness.stages.policy``).

Then, per configuration (preflight only), a measurement in a Ray task holding one training
worker's resources: a few iterations at the configuration's crop, per-worker batch and
precision (data loading and step timed apart), peak memory, and one ADE-sized validation image
evaluated ss and ms+flip; ``project`` turns that into the wall time and GPU-hours of the full
schedule on this cluster.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.atomic import write_json
from harness.config import Config, InputError
from harness.tracking import check_tracking_uri

if TYPE_CHECKING:
    from harness.stages import Policy

CHEAP = ("weights", "data layout", "tracking", "ray", "run directory", "resources")
MEASURED_ITERATIONS = 3
PROBE_TIMEOUT_S = 60
DATA_CHECK_CACHE = "data-check-1"  # bump when the full check starts finding new problems
ASSUMPTIONS = ("DDP scales linearly (per-worker step time at every world size; gradient all-reduce not "
               "counted); each loader process has a core of its own; start-up, checkpoints and the "
               "benchmark stage not counted")


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    detail: str


@dataclass
class Target:
    """What the run will use: the arguments of ``reproduce`` that the checks look at."""

    cfgs: list[Config]
    data_root: Path
    run_dir: Path
    tracking_uri: str
    address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0
    backbone_dir: Path | None = None
    from_scratch: bool = False


# ---------------------------------------------------------------- checks

def _weights(t: Target) -> str:
    from harness.weights import resolve_all

    return "; ".join(f"{r.cfg.name}: {r.note}" for r in resolve_all(t.cfgs, t.backbone_dir, t.from_scratch))


def _data_layout(t: Target) -> str:
    from harness.data.ade20k import list_pairs

    counts = []
    for split in ("training", "validation"):
        try:
            counts.append(f"{len(list_pairs(t.data_root, split))} {split}")
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"--data-root {t.data_root}: {e}") from None
    return " + ".join(counts) + " image/label pairs"


def full_data_check(root: str | os.PathLike, progress: bool = False) -> dict:
    """The full ``data check`` of ``root``, or its cached pass for the same fingerprint.

    Returns ``{"fingerprint", "root", "ok", "problems", "pairs", "seconds", "checked_at",
    "cached"}``; only a pass is cached (a failure is found again every time).
    """
    from harness.data.ade20k import dataset_dir
    from harness.data.check import check_dataset
    from harness.data.fingerprint import cache_dir, dataset_fingerprint

    fingerprint = dataset_fingerprint(root)
    path = cache_dir() / DATA_CHECK_CACHE / f"{fingerprint}.json"
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    start = time.perf_counter()
    problems = check_dataset(root, progress=progress)
    base = dataset_dir(root)
    record = {"fingerprint": fingerprint, "root": str(base), "ok": not problems,
              "problems": [str(p) for p in problems],
              "pairs": sum(1 for _ in base.glob("images/*/*.jpg")),
              "seconds": time.perf_counter() - start, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if not problems:
        write_json(path, record, indent=1)
    return {**record, "cached": False}


def _tracking(t: Target) -> str:
    from mlflow import MlflowClient

    check_tracking_uri(t.tracking_uri)
    try:
        n = len(MlflowClient(t.tracking_uri).search_experiments(max_results=100))
    except Exception as e:  # the store's own errors vary by backend: report the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"tracking URI {t.tracking_uri}: {type(e).__name__}: {first}") from None
    return f"{t.tracking_uri} answers ({n} experiment(s))"


def _ray(t: Target) -> str:
    import ray

    from harness.raylib import ensure_ray

    ensure_ray(t.address)
    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    return f"{nodes} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def _probe(directory: str, token: str, node_id: str) -> str | None:
    """On one node: read the driver's token, write this node's; None, or what went wrong."""
    try:
        seen = Path(directory, "driver").read_text()
        Path(directory, node_id).write_text(token)
    except OSError as e:
        return f"{e.strerror or e} ({e.filename})"
    return None if seen == token else "sees a different file (not the same directory)"


def _run_directory(t: Target) -> str:
    import shutil

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        t.run_dir.mkdir(parents=True, exist_ok=True)
        probe_dir = Path(tempfile.mkdtemp(prefix=".preflight-", dir=t.run_dir))
    except OSError as e:
        raise InputError(f"--run-dir {t.run_dir}: not writable ({e.strerror or e})") from None
    try:
        token = uuid.uuid4().hex
        (probe_dir / "driver").write_text(token)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        task = ray.remote(num_cpus=0, max_retries=0)(_probe)
        refs = {node: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(str(probe_dir), token, node) for node in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        bad = []
        for node, ref in refs.items():
            if ref not in ready:
                ray.cancel(ref)
                bad.append(f"node {node[:12]}: no answer in {PROBE_TIMEOUT_S} s")
                continue
            error = ray.get(ref)
            if error is None and (probe_dir / node).read_text() != token:
                error = "wrote a file the driver cannot read back"
            if error:
                bad.append(f"node {node[:12]}: {error}")
        if bad:
            raise InputError(f"--run-dir {t.run_dir}: not visible from every Ray node: {'; '.join(bad)}")
        return f"{t.run_dir} writable and visible from {len(nodes)} node(s)"
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


def _resources(t: Target) -> str:
    import ray

    from harness.stages import policy

    have = ray.cluster_resources()
    p = policy(gpus_per_worker=t.gpus_per_worker)
    # evaluation and the benchmark fit a node by the policy's choice; the training workers together
    # must fit the cluster
    train = {"CPU": t.workers * p.train.cpus, "GPU": t.workers * p.train.gpus}
    short = [f"train asks {need:g} {kind}, the cluster has {have.get(kind, 0):g}"
             for kind, need in train.items() if need > have.get(kind, 0)]
    if short:
        raise InputError(f"--workers {t.workers} --gpus-per-worker {t.gpus_per_worker:g}: {'; '.join(short)}")
    return (f"train {t.workers} x ({p.train.describe()}); eval {p.eval.describe()}; bench {p.bench.describe()} "
            f"(all its CPUs, alone) of {have.get('CPU', 0):g} CPU + {have.get('GPU', 0):g} GPU")


CHECKS = {"weights": _weights, "data layout": _data_layout, "tracking": _tracking, "ray": _ray,
          "run directory": _run_directory, "resources": _resources}
NEEDS_RAY = ("run directory", "resources")


def run_checks(t: Target, names=CHEAP) -> list[Check]:
    """Run the named checks in order; a check that needs Ray is skipped when Ray failed."""
    out: list[Check] = []
    for name in names:
        if name in NEEDS_RAY and any(c.name == "ray" and c.status == "fail" for c in out):
            out.append(Check(name, "skip", "not run: Ray did not answer"))
            continue
        try:
            out.append(Check(name, "pass", CHECKS[name](t)))
        except InputError as e:
            out.append(Check(name, "fail", str(e)))
    return out


def require_cheap_checks(t: Target) -> None:
    """What ``reproduce`` runs before any work: the first failing cheap check is an InputError."""
    for name in CHEAP:
        (check,) = run_checks(t, (name,))
        if check.status == "fail":
            raise InputError(check.detail)


# ---------------------------------------------------------------- measurement

def measure(cfg: Config, data_root: str, workers: int, iterations: int = MEASURED_ITERATIONS) -> dict:
    """One training worker's cost of ``cfg`` (runs inside a Ray task holding that worker's
    resources): ``iterations`` steps after one warm-up at the crop, per-worker batch and
    precision of the run, batches fetched in this process so that loading and the step are
    timed apart; then one validation image evaluated ss and ms+flip."""
    import torch

    from harness.benchmark import _sync, peak_memory_mb
    from harness.data.ade20k import ADE20K
    from harness.evaluate import Protocol, model_predictor
    from harness.models import build_model
    from harness.optim import build_optimizer
    from harness.train.loop import _loader, _train_transform, precision, train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    per_worker = cfg.optim.batch_size // workers
    train_set = ADE20K(data_root, "training", _train_transform(cfg), seed=cfg.optim.seed)
    per_epoch = len(train_set) // workers // per_worker
    if per_epoch == 0:
        raise InputError(f"{data_root}: {len(train_set)} training images are fewer than one global batch "
                         f"({cfg.optim.batch_size})")
    # the loader's cost per batch in one process; its worker processes divide it in the projection
    serial = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=0))
    batches = itertools.chain.from_iterable(
        _loader(train_set, serial, epoch, 0, per_worker, per_epoch, 0, workers) for epoch in itertools.count())

    model = build_model(cfg.model).to(device).train()  # random weights time the same as trained ones
    optimizer, scheduler = build_optimizer(model, cfg)
    amp, scaler = precision(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loads, steps = [], []
    for i in range(1 + iterations):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        train_step(model, model, batch, optimizer, scheduler, scaler, amp, cfg, device)
        _sync(device)
        if i:  # the first iteration warms up (allocator, kernels selection, first file reads)
            loads.append(t1 - t0)
            steps.append(time.perf_counter() - t1)
    memory, memory_kind = peak_memory_mb(device)

    del optimizer, scheduler
    model.eval()
    item = ADE20K(data_root, "validation")[0]
    seconds = {}
    for mode, ms_flip in (("ss", False), ("msflip", True)):
        predict = model_predictor(model, cfg, Protocol.of(cfg, ms_flip), device)
        t0 = time.perf_counter()
        predict(item)  # returns on the CPU: the device is synchronised
        seconds[mode] = time.perf_counter() - t0
    return {"config": cfg.name, "device": str(device), "cpu_threads": torch.get_num_threads(),
            "per_worker_batch": per_worker, "crop": cfg.data.crop_size,
            "precision": cfg.optim.amp if device.type == "cuda" else "fp32",
            "loader_processes": cfg.data.num_workers, "iterations": iterations,
            "loader_s_per_batch": sum(loads) / len(loads), "step_s": sum(steps) / len(steps),
            "peak_memory_mb": memory, "peak_memory_kind": memory_kind,
            "eval_image_hw": list(item["image"].shape[:2]),
            "eval_ss_s": seconds["ss"], "eval_msflip_s": seconds["msflip"]}


def project(m: dict, cfg: Config, workers: int, gpus_per_worker: float, val_images: int,
            eval_gpus: float) -> dict:
    """The full schedule's wall time and GPU-hours from one worker's measurement ``m``.

    iteration = max(step, loader per batch / loader processes) (step + loader without loader
    processes); training = iterations x iteration; evaluations during training = one every
    eval_interval and at the end, single-scale over the validation split sharded over the
    training workers; final = ss + ms+flip over the validation split in one evaluation task
    (holding ``eval_gpus``).
    """
    o = cfg.optim
    procs = m["loader_processes"]
    loader_it = m["loader_s_per_batch"] / procs if procs else m["loader_s_per_batch"]
    it_s = max(m["step_s"], loader_it) if procs else m["step_s"] + loader_it
    train_s = o.iterations * it_s
    val_evals = math.ceil(o.iterations / o.eval_interval)
    val_s = val_evals * math.ceil(val_images / workers) * m["eval_ss_s"]
    final_s = val_images * (m["eval_ss_s"] + m["eval_msflip_s"])
    gpu_s = (train_s + val_s) * workers * gpus_per_worker + final_s * eval_gpus
    return {"loader_s_per_iteration": loader_it, "iteration_s": it_s,
            "loader_bound": loader_it > m["step_s"], "train_s": train_s, "val_evals": val_evals,
            "val_during_training_s": val_s, "final_eval_s": final_s, "wall_s": train_s + val_s + final_s,
            "gpu_hours": gpu_s / 3600}


def _measure_one(t: Target, cfg: Config, iterations: int, plan: Policy, val_images: int) -> dict:
    import ray

    # a fresh process per configuration (max_calls=1): its peak RSS is this measurement's
    task = ray.remote(max_calls=1, max_retries=0)(measure).options(**plan.train.options())
    m = ray.get(task.remote(cfg, str(t.data_root), t.workers, iterations))
    return {"config": cfg.name, "measured": m, "held": plan.train.describe(),
            "projection": project(m, cfg, t.workers, t.gpus_per_worker, val_images, plan.eval.gpus)}


# ---------------------------------------------------------------- the whole preflight

def run_preflight(t: Target, iterations: int = MEASURED_ITERATIONS, progress: bool = True) -> dict:
    """Every check, then (when the data passed and Ray answers) the measurement of every
    configuration. ``ok`` is true only when nothing failed."""
    import sys

    if iterations < 1:
        raise InputError(f"--preflight-iterations must be at least 1, got {iterations}")
    checks = run_checks(t, CHEAP[:2])
    data = None
    if checks[-1].status == "pass":
        data = full_data_check(t.data_root, progress=progress)
        if data["ok"]:
            detail = f"{data['pairs']} pairs decode with valid labels, " + (
                f"cached pass of {data['checked_at']}" if data["cached"] else f"checked in {data['seconds']:.0f} s")
            checks.append(Check("data full check", "pass", detail))
        else:
            more = len(data["problems"]) - 1
            checks.append(Check("data full check", "fail", data["problems"][0] + (
                f" (and {more} more problem(s): segrepro data check --root {t.data_root})" if more else "")))
    else:
        checks.append(Check("data full check", "skip", "not run: the data layout failed"))
    checks += run_checks(t, CHEAP[2:])

    status = {c.name: c.status for c in checks}
    configs = []
    measurable = status["data full check"] == "pass" and status["ray"] == "pass"
    if measurable:
        import ray

        from harness.data.ade20k import ADE20K
        from harness.stages import policy

        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        if t.gpus_per_worker > cluster_gpus:
            measurable = False
            reason = f"not measured: one worker asks {t.gpus_per_worker:g} GPU, the cluster has {cluster_gpus:g}"
        else:
            try:
                plan = policy(gpus_per_worker=t.gpus_per_worker)
            except InputError as e:
                measurable, reason = False, f"not measured: {e}"
        val_images = len(ADE20K(t.data_root, "validation"))
    else:
        reason = "not measured: " + ("the data check failed" if status["data full check"] != "pass"
                                     else "Ray did not answer")
    for cfg in t.cfgs:
        if not measurable:
            configs.append({"config": cfg.name, "error": reason})
            continue
        if progress:
            print(f"preflight: {cfg.name}: {iterations} iteration(s) after a warm-up, then one image ss and "
                  f"ms+flip", file=sys.stderr, flush=True)
        try:
            configs.append(_measure_one(t, cfg, iterations, plan, val_images))
        except Exception as e:  # a configuration that cannot train here (memory, kernels) fails its row
            cause = getattr(e, "cause", None) or e  # a RayTaskError carries the task's exception
            line = (str(cause).strip().splitlines() or [""])[0]
            configs.append({"config": cfg.name, "error": f"measurement failed: {type(cause).__name__}: {line}"})
        if progress and "measured" in configs[-1]:  # a long preflight shows each result as it comes
            m, p = configs[-1]["measured"], configs[-1]["projection"]
            print(f"preflight: {cfg.name}: loader {p['loader_s_per_iteration']:.3f} s/it, step {m['step_s']:.3f} s/it, "
                  f"peak {m['peak_memory_mb']:.0f} MB, ss {m['eval_ss_s']:.2f} s, ms+flip {m['eval_msflip_s']:.2f} s, "
                  f"full schedule {_duration(p['wall_s'])}", file=sys.stderr, flush=True)
    measured = [c for c in configs if "projection" in c]
    total = {"wall_s": sum(c["projection"]["wall_s"] for c in measured),
             "gpu_hours": sum(c["projection"]["gpu_hours"] for c in measured)}
    ok = all(c.status != "fail" for c in checks) and all("error" not in c for c in configs)
    return {"ok": ok, "checks": [asdict(c) for c in checks], "data": data, "configs": configs, "total": total,
            "workers": t.workers, "gpus_per_worker": t.gpus_per_worker, "assumptions": ASSUMPTIONS}


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_report(r: dict) -> str:
    from tabulate import tabulate

    lines = [tabulate([[c["name"], c["status"].upper(), c["detail"]] for c in r["checks"]],
                      headers=["check", "result", "detail"], disable_numparse=True,
                      maxcolwidths=[None, None, 100]), ""]  # a long message wraps instead of widening
    rows, errors = [], []
    for c in r["configs"]:
        if "error" in c:  # below the table, which a long message would stretch
            rows.append([c["config"], "not measured"] + [""] * 7)
            errors.append(f"{c['config']}: {c['error']}")
            continue
        m, p = c["measured"], c["projection"]
        rows.append([c["config"], f"{m['per_worker_batch']} x {m['crop']}² {m['precision']} {m['device']}",
                     f"{p['loader_s_per_iteration']:.3f}" + (" (bound)" if p["loader_bound"] else ""),
                     f"{m['step_s']:.3f}", f"{m['peak_memory_mb']:.0f}", f"{m['eval_ss_s']:.2f}",
                     f"{m['eval_msflip_s']:.2f}", _duration(p["wall_s"]), f"{p['gpu_hours']:.1f}"])
    lines.append(tabulate(rows, headers=["config", "batch/worker x crop", "loader s/it", "step s/it", "peak MB",
                                         "ss s/img", "ms+flip s/img", "full schedule", "GPU-h"],
                          disable_numparse=True))
    lines += errors
    measured = [c for c in r["configs"] if "measured" in c]
    if measured:
        m, held = measured[0]["measured"], measured[0]["held"]
        lines += [
            "",
            f"total, configurations one after another: {_duration(r['total']['wall_s'])}, "
            f"{r['total']['gpu_hours']:.1f} GPU-h on {r['workers']} worker(s) x {r['gpus_per_worker']:g} GPU",
            f"measured on one worker (a Ray task with {held}, {m['cpu_threads']} CPU "
            f"thread(s)): mean of {m['iterations']} iteration(s) after one warm-up; loader s/it = one process's "
            "seconds per batch / the config's loader processes ('bound': slower than the step); step = forward, "
            f"loss, backward, update; peak MB = {m['peak_memory_kind']} while training; ss and ms+flip = one "
            f"{m['eval_image_hw'][0]}x{m['eval_image_hw'][1]} validation image",
            "full schedule = iterations x max(step, loader) + evaluations during training (ss, every eval_interval, "
            "validation split over the training workers) + final ss and ms+flip over the validation split; "
            "GPU-h = GPU-seconds in use / 3600",
            f"assumes: {r['assumptions']}",
        ]
    failed = [c["name"] for c in r["checks"] if c["status"] == "fail"] + \
        [f"{c['config']} not measured" for c in r["configs"] if "error" in c]
    lines += ["", "preflight: " + ("everything passed" if r["ok"] else "FAILED: " + ", ".join(failed))]
    return "\n".join(lines)
