"""``make gpu-check`` / ``python -m harness.gpucheck``: validate a CUDA GPU in one command.

On whatever GPU it finds it runs, one step after another (a failing step does not stop the
others):
1. the GPU-only kernel tests (``pytest -m gpu tests/test_kernels``: the compiled Triton kernels
   against their PyTorch references, forward and backward, fp32/fp16/bf16);
2. ``segrepro kernels profile`` on the zoo shapes (fp16), CSV under ``OUT/kernels``;
3. a generated dataset in the ADE20K layout (``OUT/data``);
4. seg_tiny_mask from scratch, 20 iterations in fp32 and in bf16, stopped after 10 and resumed
   from that checkpoint: on Ray Train with NCCL where Ray is importable, in this process
   (``LocalSession``) otherwise, which the summary says;
5. single-scale and multi-scale+flip evaluation of the trained checkpoint on a few images;
6. ``segrepro bench`` of the five seed configurations (fp32, and bf16 unless ``--quick``).

It writes ``summary.json`` and ``summary.md`` under ``--out`` (rewritten after every step) and
exits 1 if any step failed. Where no CUDA GPU is visible it prints one line, writes nothing and
exits 0. It needs only torch, triton, timm, numpy, Pillow, PyYAML, nvidia-ml-py, tqdm and
pytest: Ray and MLflow are imported only when present.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from harness.atomic import write_text
from harness.benchmark import benchmark
from harness.cli import _zoo_model_dims
from harness.config import Config, InputError, load_config
from harness.data.synth import METADATA_FILE, synthesize
from harness.evaluate import run_eval
from harness.reproduce import SEED_CONFIGS
from harness.train.checkpoint import MODEL_FILE
from harness.train.driver import train
from harness.train.loop import format_progress, train_loop
from harness.train.session import LocalSession
from kernels.device import device_facts
from kernels.profile import CSV_NAME, ZOO_BATCHES, ZOO_IMAGE_SIZES, csv_text, profile_gpu, zoo_shapes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("runs") / "gpu-check"
NO_GPU_MESSAGE = ("gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False): gpu-check has nothing "
                  "to run; nothing was written. Run `make gpu-check` on a machine with an NVIDIA GPU.")
# Only the kernel tests: tests/test_gpucheck.py's GPU test runs gpu-check itself.
GPU_TEST_PATHS = ("tests/test_kernels",)
TRAIN_MODEL = "seg_tiny_mask"
ITERATIONS = 20
LOG_INTERVAL = 5
PRECISIONS = ("fp32", "bf16")
# ADE20K-like 4:3 images; 32 of them at batch 8 make 4 iterations per epoch, so the resume at
# iteration 10 lands mid-epoch and the loader must skip exactly the consumed batches.
SYNTH = {"train": 32, "val": 4, "size": (512, 683), "classes": 8, "seed": 0}
# --quick: the kernel profile on the zoo's batch 8 at 512 only (the shapes of the README's
# goals), fewer images evaluated, a shorter fp32-only benchmark.
QUICK_PROFILE = ((8,), (512,))
GOALS = {  # (figure, numerator shape/impl, denominator shape/impl): fwd median ms ratios
    "attn_fwd_triton_over_sdpa_flash": (("attn:B=8,H=12,N=1025,D=64", "triton"),
                                        ("attn:B=8,H=12,N=1025,D=64", "sdpa_flash_attention")),
    "mask_fwd_reference_over_triton": (("mask:B=8,N=1024,C=150,D=768", "reference"),
                                       ("mask:B=8,N=1024,C=150,D=768", "triton")),
}
STATUSES = ("passed", "failed", "skipped")


# ---------------------------------------------------------------- step records

@dataclass
class StepRecord:
    name: str
    status: str = "passed"
    reason: str = ""
    seconds: float = 0.0
    figures: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.status = "failed"
        self.reason = f"{self.reason}; {why}" if self.reason else why


def say(line: str) -> None:
    print(line, flush=True)


def run_step(name: str, body: Callable, *args) -> StepRecord:
    """``body(record, *args)`` timed; an exception fails the step (traceback on stderr), not the run."""
    say(f"gpu-check: {name} ...")
    rec = StepRecord(name)
    start = time.perf_counter()
    try:
        body(rec, *args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's time includes its queued GPU work
    except Exception as e:  # noqa: BLE001 - one failing step must not stop the others
        traceback.print_exc()
        rec.fail(f"{type(e).__name__}: {e}")
    rec.seconds = time.perf_counter() - start
    with contextlib.suppress(RuntimeError):  # a CUDA error left behind fails the next steps, not this line
        torch.cuda.empty_cache()  # what the step cached goes back before the next one
    say(f"gpu-check: {name}: {rec.status} in {rec.seconds:.1f} s" + (f" ({rec.reason})" if rec.reason else ""))
    return rec


def skipped(name: str, reason: str) -> StepRecord:
    say(f"gpu-check: {name}: skipped ({reason})")
    return StepRecord(name, "skipped", reason)


def _finite(value):
    """JSON has no NaN or infinity: they become null (a failed figure, which the step says)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def summarize(records: list[StepRecord], device: dict, quick: bool, started: float) -> dict:
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    return _finite({
        "passed": counts["failed"] == 0, "counts": counts, "quick": quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": time.time() - started, "device": device, "steps": [asdict(r) for r in records],
    })


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return "-" if value is None else str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows)]


def format_markdown(summary: dict) -> str:
    d = summary["device"]
    where = d.get("gpu_name") or d.get("cpu_model") or d.get("error", "unknown device")
    lines = [f"# gpu-check: {'passed' if summary['passed'] else 'FAILED'}", "",
             f"{where}; torch {d.get('torch_version')}, triton {d.get('triton_version')}, driver "
             f"{d.get('driver_version')}; started {summary['started']}, {summary['seconds']:.0f} s"
             f"{' (--quick)' if summary['quick'] else ''}; "
             + ", ".join(f"{n} {s}" for s, n in summary["counts"].items()), "",
             *_table(["step", "status", "seconds", "reason"],
                     [[s["name"], s["status"], round(s["seconds"], 1), s["reason"]] for s in summary["steps"]])]
    for s in summary["steps"]:
        if not (s["figures"] or s["rows"]):
            continue
        lines += ["", f"## {s['name']}", ""]
        if s["figures"]:
            lines += _table(["figure", "value"], [[k, v] for k, v in s["figures"].items()])
        if s["rows"]:
            keys = list(dict.fromkeys(k for row in s["rows"] for k in row))
            lines += ["", *_table(keys, [[row.get(k) for k in keys] for row in s["rows"]])]
    lines += ["", "## device", "", *_table(["fact", "value"], [[k, v] for k, v in d.items()])]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, summary: dict) -> tuple[Path, Path]:
    """``summary.json`` and ``summary.md`` under ``out_dir``, each replaced in one rename."""
    paths = out_dir / "summary.json", out_dir / "summary.md"
    # default=str: an odd figure type must not cost the whole summary
    write_text(paths[0], json.dumps(summary, indent=2, default=str) + "\n")
    write_text(paths[1], format_markdown(summary))
    return paths


# ---------------------------------------------------------------- step 1: the GPU-only tests

def junit_counts(path: Path) -> tuple[dict, list[str]]:
    """(tests/passed/failed/errors/skipped counts, ids of the failed tests) of a pytest JUnit XML."""
    root = ET.parse(path).getroot()
    counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for suite in root.iter("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"tests": counts["tests"], "passed": counts["tests"] - counts["failures"] - counts["errors"]
            - counts["skipped"], "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"]}, failed


def _gpu_tests(rec: StepRecord, out_dir: Path, paths: tuple[str, ...]) -> None:
    xml, log = out_dir / "gpu_tests.xml", out_dir / "gpu_tests.log"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *paths, "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True) as proc:
        for line in proc.stdout:
            f.write(line)
            print("  " + line, end="", flush=True)
    rec.figures.update(command=" ".join(cmd[1:]), exit_status=proc.returncode, log=str(log))
    if not xml.is_file():
        rec.fail(f"pytest exited {proc.returncode} without a report; see {log}")
        return
    counts, failed = junit_counts(xml)
    rec.figures.update(counts)
    if failed:
        rec.fail(f"{len(failed)} failed: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}; see {log}")
    elif proc.returncode != 0:
        rec.fail(f"pytest exited {proc.returncode}; see {log}")
    elif counts["passed"] == 0:
        rec.fail(f"no GPU test passed ({counts['skipped']} skipped); see {log}")


def gpu_tests_step(out_dir: Path, paths: tuple[str, ...] = GPU_TEST_PATHS) -> StepRecord:
    return run_step("GPU-only tests", _gpu_tests, out_dir, paths)


# ---------------------------------------------------------------- step 2: kernels profile

def _median_ms(rows: list[dict], shape: str, impl: str) -> float | None:
    for r in rows:
        if (r["shape"], r["impl"], r["direction"], r["stat"]) == (shape, impl, "fwd", "median"):
            return r["ms"]
    return None


def _profile(rec: StepRecord, out_dir: Path, quick: bool) -> None:
    batches, sizes = QUICK_PROFILE if quick else (ZOO_BATCHES, ZOO_IMAGE_SIZES)
    used_by = zoo_shapes(_zoo_model_dims(), batches, sizes)
    rows, facts = profile_gpu(list(used_by), torch.float16, used_by, progress=sys.stdout)
    csv_path = write_text(out_dir / "kernels" / CSV_NAME["gpu"], csv_text(rows))
    triton = [r for r in rows if r["impl"] == "triton" and r["stat"] == "median"]
    untimed = [f"{r['shape']} {r['direction']} ({r['status']})" for r in triton if r["status"] != "ok"]
    rec.figures.update(shapes=len(used_by), batches=list(batches), image_sizes=list(sizes), dtype="fp16",
                       timed=sum(r["ms"] is not None for r in rows if r["stat"] == "median"),
                       not_timed=sum(r["ms"] is None for r in rows), triton_not_timed=len(untimed),
                       peak_matmul_tflops=facts["peak_matmul_tflops"], peak_copy_gb_s=facts["peak_copy_gb_s"],
                       csv=str(csv_path))
    # The README's speed goals, as figures: gpu-check validates that the kernels run and are
    # right; whether they are fast enough is for the reader to judge from these.
    for name, (num, den) in GOALS.items():
        a, b = _median_ms(rows, *num), _median_ms(rows, *den)
        rec.figures[name] = a / b if a and b else None
    if untimed:
        rec.fail(f"Triton kernel not timed on {len(untimed)} shape(s): {', '.join(untimed[:3])}")


def profile_step(out_dir: Path, quick: bool) -> StepRecord:
    return run_step("kernels profile (zoo shapes, fp16)", _profile, out_dir, quick)


# ---------------------------------------------------------------- step 3: data

def _data(rec: StepRecord, root: Path, spec: dict) -> None:
    meta = root / "ADEChallengeData2016" / METADATA_FILE
    wanted = {**spec, "size": list(spec["size"])}
    old = json.loads(meta.read_text()) if meta.is_file() else {}
    if {k: old.get(k) for k in wanted} != wanted:
        synthesize(root, **spec, overwrite=True)
    rec.figures.update(root=str(root), **wanted)


def data_step(root: Path, spec: dict = SYNTH) -> StepRecord:
    return run_step("generated dataset", _data, root, spec)


# ---------------------------------------------------------------- step 4: training

def training_config(precision: str, extra: dict | None = None) -> Config:
    """seg_tiny_mask, 20 iterations in ``precision``: checkpoint at 10, a record every 5.

    The zoo's own 512 crop at its global batch 8, not the smoke profile's 64: a GPU check must
    exercise the token counts (1025 per image, not 17), memory and speed the zoo trains at, and
    20 such iterations of Seg-T take seconds on a data-centre GPU. ``extra`` overrides sections
    on top (the CPU tests shrink the model with it).
    """
    # from random init: the check measures the machine, and a bare GPU machine has no weights
    overrides = {"model": {"init": "scratch"},
                 "optim": {"iterations": ITERATIONS, "amp": precision, "checkpoint_interval": ITERATIONS // 2,
                           "eval_interval": ITERATIONS, "log_interval": LOG_INTERVAL}}
    for section, values in (extra or {}).items():
        overrides.setdefault(section, {}).update(values)
    return load_config(TRAIN_MODEL, overrides=overrides)


@dataclass(frozen=True)
class TraceLosses:
    """Training hook: one JSON line per rank and finished iteration in ``path`` (``check_trace``
    reads them)."""
    path: str

    def on_iteration(self, rank: int, iteration: int, start: int, loss: float, checkpointed: bool) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"rank": rank, "iteration": iteration, "start": start, "loss": loss}) + "\n")


@dataclass(frozen=True)
class StopRankZero:
    """Training hook: rank 0 SIGKILLs itself after iteration ``after``, as a lost node stops,
    once (``marker`` remembers it across the restart)."""
    after: int
    marker: str

    def on_iteration(self, rank: int, iteration: int, start: int, loss: float, checkpointed: bool) -> None:
        if rank == 0 and iteration == self.after and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def _ray_workers(device: torch.device, batch: int) -> int:
    """As many GPUs as are visible and divide the global batch, so NCCL carries DDP traffic where it can."""
    if device.type != "cuda":
        return 1
    return max(w for w in range(1, torch.cuda.device_count() + 1) if batch % w == 0)


def _train_in_process(cfg: Config, data_root: Path, run_dir: Path, device: torch.device,
                      progress: Callable[[dict], None], trace: TraceLosses) -> tuple[Path, int]:
    session = LocalSession(run_dir, device, hooks=[trace])
    train_loop(cfg, data_root, session, progress=progress, stop_after=cfg.optim.iterations // 2)
    train_loop(cfg, data_root, session, progress=progress)
    return session.checkpoints()[-1] / MODEL_FILE, 1


def _train_on_ray(cfg: Config, data_root: Path, run_dir: Path, device: torch.device,
                  progress: Callable[[dict], None], trace: TraceLosses) -> tuple[Path, int]:
    o = cfg.optim
    workers = _ray_workers(device, o.batch_size)
    # train() runs to the end: stop it the way a lost node does (rank 0 dies once) and let
    # Ray Train restore every rank from the checkpoint at half-way. Not right after
    # that checkpoint: Ray's controller takes reports from a one-slot queue every few seconds, so
    # only the next report (a log interval later) proves it has the checkpoint, and two more
    # iterations let its reply arrive before the kill. Those iterations are replayed.
    kill_at = o.iterations // 2 + o.log_interval + 2
    if kill_at > o.iterations:
        raise ValueError(f"optim.iterations {o.iterations} leaves no room to stop the run at iteration {kill_at}")
    say(f"  rank 0 is killed on purpose before iteration {kill_at} (Ray reports a dead worker), then resumed")
    import ray

    hooks = [trace, StopRankZero(after=kill_at - 1, marker=str(run_dir / "killed"))]
    try:
        out = train(cfg, data_root, run_dir, workers=workers, gpus_per_worker=1 if device.type == "cuda" else 0,
                    resume=False, progress_callback=progress, hooks=hooks)
    finally:
        ray.shutdown()  # train() started Ray for this run: gpu-check leaves no Ray behind
    return Path(out["checkpoint"]), workers


def _span(iterations: list[int]) -> str:
    return f"{iterations[0]}..{iterations[-1]}" if iterations else "none"


def check_trace(lines: list[dict], workers: int, half: int, total: int) -> tuple[dict[int, float], float | None,
                                                                                   list[str]]:
    """From the ``TraceLosses`` lines of a run stopped after ``half`` and resumed: rank 0's loss per
    iteration (the resumed run's where replayed), the largest loss difference between an
    iteration and its replay, and what is wrong with the runs' spans."""
    problems = []
    starts = sorted({line["start"] for line in lines})
    if starts != [0, half]:
        problems.append(f"expected a run from the start and one resumed at iteration {half}, got runs starting "
                        f"at {starts}")
    by_run: dict[tuple[int, int], dict[int, float]] = {}
    for line in lines:
        by_run.setdefault((line["rank"], line["start"]), {})[line["iteration"]] = line["loss"]
    for rank in range(workers):
        first, resumed = sorted(by_run.get((rank, 0), {})), sorted(by_run.get((rank, half), {}))
        if first[:half] != list(range(1, half + 1)) or resumed != list(range(half + 1, total + 1)):
            problems.append(f"rank {rank}: iterations {_span(first)} first, {_span(resumed)} resumed; expected "
                            f"1..{half} (or a few more), then {half + 1}..{total}")
    first, resumed = by_run.get((0, 0), {}), by_run.get((0, half), {})
    replayed = [abs(first[t] - resumed[t]) for t in first.keys() & resumed.keys()]
    return {**first, **resumed}, max(replayed) if replayed else None, problems


def _train(rec: StepRecord, cfg: Config, data_root: Path, run_dir: Path, device: torch.device, on_ray: bool,
           result: dict) -> None:
    o = cfg.optim
    half = o.iterations // 2
    if o.checkpoint_interval != half or half % o.log_interval:
        raise ValueError(f"optim.checkpoint_interval must be {half} and a multiple of optim.log_interval "
                         f"({o.checkpoint_interval}, {o.log_interval})")
    shutil.rmtree(run_dir, ignore_errors=True)  # from scratch every time
    run_dir.mkdir(parents=True)
    trace = run_dir / "trace.jsonl"
    records: list[dict] = []

    def progress(record: dict) -> None:
        records.append(record)
        say("  " + format_progress(record))

    body = _train_on_ray if on_ray else _train_in_process
    checkpoint, workers = body(cfg, data_root, run_dir, device, progress, TraceLosses(str(trace)))
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    losses, replay_diff, problems = check_trace(lines, workers, half, o.iterations)
    last, before = records[-1], records[-2]  # both from the resumed run: its last log interval
    peaks = [r["peak_memory_mb"] for r in records if "peak_memory_mb" in r]
    rec.figures.update(
        precision=o.amp, weights="random (from scratch)", crop=cfg.data.crop_size, global_batch=o.batch_size,
        workers=workers, iterations=last["iteration"], resumed_from=max(line["start"] for line in lines),
        losses=[losses[t] for t in sorted(losses)], replayed_max_loss_diff=replay_diff,
        s_per_iteration=(last["elapsed_s"] - before["elapsed_s"]) / (last["iteration"] - before["iteration"]),
        peak_memory_mb=max(peaks) if peaks else None, val_mIoU=last.get("val/mIoU"), checkpoint=str(checkpoint))
    for problem in problems:
        rec.fail(problem)
    if last["iteration"] != o.iterations:
        rec.fail(f"the run ended at iteration {last['iteration']}, not {o.iterations}")
    if not all(math.isfinite(v) for v in losses.values()):
        rec.fail("a loss is not finite")
    if rec.status == "passed":
        result["checkpoint"] = checkpoint


def train_step(cfg: Config, data_root: Path, run_dir: Path, device: str | torch.device, on_ray: bool,
               result: dict | None = None) -> StepRecord:
    """Train ``cfg`` from scratch to half its iterations, checkpoint, resume to the end; a passing
    run puts its final checkpoint in ``result["checkpoint"]``."""
    device = torch.device(device)
    runner = f"Ray Train, {'NCCL' if device.type == 'cuda' else 'gloo'}" if on_ray else "in-process"
    return run_step(f"train {cfg.name} {cfg.optim.amp} ({runner})", _train, cfg, Path(data_root), Path(run_dir),
                    device, on_ray, {} if result is None else result)


def ray_missing() -> str | None:
    """Why Ray cannot be used here, or None when it can."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------- step 5: evaluation

def _evaluate(rec: StepRecord, checkpoint: Path, cfg: Config, data_root: Path, out_dir: Path, limit: int) -> None:
    rec.figures.update(checkpoint=str(checkpoint), images=limit)
    for ms_flip in (False, True):
        r = run_eval(checkpoint, cfg, data_root, ms_flip, limit, 1, out_dir, progress=False)
        mode = r["protocol"]["mode"]
        rec.figures.update({f"{mode}_{k}": r[k] for k in ("mIoU", "mAcc", "aAcc", "images_per_s")})
        bad = [k for k in ("mIoU", "mAcc", "aAcc") if not 0 <= r[k] <= 100]  # NaN fails too
        if bad or r["images"] != limit:
            rec.fail(f"{mode}: {r['images']} images, {', '.join(f'{k} {r[k]}' for k in bad)}")


def eval_step(checkpoint: Path | None, cfg: Config, data_root: Path, out_dir: Path, limit: int) -> StepRecord:
    name = "eval ss and ms+flip"
    if checkpoint is None:
        return skipped(name, "no training run passed, so there is no checkpoint to evaluate")
    return run_step(name, _evaluate, Path(checkpoint), cfg, Path(data_root), Path(out_dir), limit)


# ---------------------------------------------------------------- step 6: benchmark

def _bench(rec: StepRecord, configs: list[Config], precisions: tuple[str, ...], warmup: int, repeats: int,
           device: str) -> None:
    keys = ("images_per_s", "latency_median_ms", "latency_p90_ms", "slide_latency_median_ms", "gflops",
            "params_m", "peak_memory_mb")
    for cfg in configs:
        for precision in precisions:
            row = {"config": cfg.name, "precision": precision}
            try:
                r = benchmark(cfg, None, 1, None, precision, None, warmup, repeats, device=device)
                row.update({k: r[k] for k in keys})
                if not all(math.isfinite(row[k]) and row[k] > 0 for k in keys):
                    rec.fail(f"{cfg.name} {precision}: a figure is not a positive number")
            except Exception as e:  # noqa: BLE001 - one configuration's failure must not hide the others'
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"
                rec.fail(f"{cfg.name} {precision}: {row['error']}")
            rec.rows.append(row)
            say(f"  {cfg.name} {precision}: " + (row.get("error") or f"{row['images_per_s']:.1f} img/s, "
                                                  f"{row['latency_median_ms']:.2f} ms"))
    rec.figures.update(batch_size=1, warmup=warmup, repeats=repeats, weights="random (throughput only)")


def bench_step(configs: list[Config], precisions: tuple[str, ...], warmup: int, repeats: int,
               device: str = "cuda") -> StepRecord:
    return run_step(f"bench {', '.join(precisions)}, batch 1", _bench, configs, precisions, warmup, repeats, device)


# ---------------------------------------------------------------- all of it

def _facts() -> dict:
    try:
        return device_facts()
    except Exception as e:  # noqa: BLE001 - NVML trouble must not stop the check; the summary says it
        return {"error": f"device facts: {type(e).__name__}: {e}"}


def run_checks(out_dir: Path, quick: bool) -> list[StepRecord]:
    """Every step (on cuda:0; training on Ray uses as many GPUs as divide its batch), the
    summary rewritten under ``out_dir`` after each."""
    started = time.time()
    facts = _facts()
    records: list[StepRecord] = []

    def add(rec: StepRecord) -> None:
        records.append(rec)
        write_summary(out_dir, summarize(records, facts, quick, started))

    add(gpu_tests_step(out_dir))
    add(profile_step(out_dir, quick))
    data_root = out_dir / "data"
    data = data_step(data_root)
    add(data)
    why_not_ray = ray_missing()
    if why_not_ray:
        add(skipped("Ray Train + NCCL", f"Ray is not importable ({why_not_ray}); trained in-process instead"))
    checkpoints: dict[str, Path] = {}
    for precision in PRECISIONS:
        cfg = training_config(precision)
        if data.status != "passed":
            add(skipped(f"train {cfg.name} {precision}", "no dataset"))
            continue
        result: dict = {}
        add(train_step(cfg, data_root, out_dir / "train" / precision, "cuda", why_not_ray is None, result))
        if "checkpoint" in result:
            checkpoints[precision] = result["checkpoint"]
    evaluated = next(iter(checkpoints), None)
    add(eval_step(checkpoints.get(evaluated), training_config(evaluated or PRECISIONS[0]), data_root,
                  out_dir / "eval", 2 if quick else SYNTH["val"]))
    configs = [load_config(name) for name in SEED_CONFIGS]
    if quick:
        add(bench_step(configs, ("fp32",), 2, 5))
    else:
        add(bench_step(configs, ("fp32", "bf16"), configs[0].bench.warmup, configs[0].bench.repeats))
    return records


def _out_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path}: exists and is not a directory")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gpucheck", description=(
        "Validate a CUDA GPU: GPU-only kernel tests, kernel profile on the zoo shapes, 20 training iterations of "
        "seg_tiny_mask in fp32 and bf16 (Ray Train + NCCL when Ray is importable) resumed once, ss and ms+flip "
        "evaluation, benchmark of the seed configurations. Exits 0 with a message where no GPU is visible."))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory for summary.json, summary.md and every step's files (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true",
                        help="profile batch 8 at 512 only, evaluate 2 images, benchmark fp32 with 5 repeats")
    args = parser.parse_args(argv)
    try:
        out_dir = _out_dir(args.out)
        if not torch.cuda.is_available():
            say(NO_GPU_MESSAGE)
            return 0
        out_dir.mkdir(parents=True, exist_ok=True)
        records = run_checks(out_dir, args.quick)
    except InputError as e:
        print(f"gpu-check: error: {e}", file=sys.stderr)
        return 2
    failed = [r.name for r in records if r.status == "failed"]
    say(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'passed'}; summary in "
        f"{out_dir / 'summary.md'} and {out_dir / 'summary.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
