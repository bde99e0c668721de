"""Throughput of the training input pipeline (decode + augmentation + collation).

Protocol: the training split through ``ADE20K`` + the recipe's train transform, a
DataLoader with ``workers`` processes, ``batch_size`` images a batch drawn with
replacement by a seeded sampler (so a small dataset still feeds every batch); the first
``warmup`` batches (worker start-up, first decodes) are not timed, the next ``n_batches``
are. Images per second = n_batches * batch_size / timed wall time; per worker = that / workers
(the main process counts as one worker when workers = 0). OpenCV and torch run one thread in
each worker (as in training: ``seed_worker``; torch in DataLoader workers), and in the main
process for the duration of the benchmark. No model runs: this is the rate at which the loader
alone can feed a trainer, printed beside what a training step consumes (from a preflight's
JSON or a given step time): per-worker batch / step time images per second.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from harness.config import InputError

from .ade20k import ADE20K, DATASET_DIRNAME, dataset_dir
from .transforms import RECIPES, build_train_transform, loader_generator, seed_worker

# Normalisation does not change the cost; the reference ViT statistics are used.
_MEAN, _STD = (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)


def bench_pipeline(root: str | Path, workers: int = 0, batch_size: int = 8, n_batches: int = 20,
                   crop_size: int = 512, recipe: str = "reference", warmup: int = 2,
                   seed: int = 0) -> dict:
    """Time the training pipeline; returns the figures with the protocol that produced them."""
    if workers < 0 or batch_size < 1 or n_batches < 1 or warmup < 0:
        raise ValueError(f"need workers >= 0, batch_size >= 1, n_batches >= 1, warmup >= 0; got "
                         f"workers={workers}, batch_size={batch_size}, n_batches={n_batches}, warmup={warmup}")
    transform = build_train_transform(recipe, crop_size, _MEAN, _STD)
    ds = ADE20K(root, "training", transform=transform, seed=seed)
    g = loader_generator(seed)
    sampler = RandomSampler(ds, replacement=True, num_samples=(warmup + n_batches) * batch_size, generator=g)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        worker_init_fn=seed_worker, generator=g, drop_last=True)
    load_before = os.getloadavg()[0]
    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(0)  # 0: OpenCV runs its parallel loops sequentially
    try:
        t_start = time.perf_counter()
        it = iter(loader)
        for _ in range(warmup):
            next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for batch in it:
            n += batch["image"].shape[0]
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])
    per_worker = n / elapsed / max(workers, 1)
    with Image.open(ds.files(0)[0]) as im:
        w, h = im.size
    return {
        "images_per_s": n / elapsed,
        "images_per_s_per_worker": per_worker,
        "ms_per_image_per_worker": 1000 / per_worker,
        # with workers = 0 the work is this process's: its CPU time, unlike wall time, does not
        # grow with other load on the machine
        "cpu_ms_per_image": 1000 * cpu / n if workers == 0 else None,
        "s_per_batch": elapsed / n_batches,
        "timed_s": elapsed,
        "warmup_s": t0 - t_start,
        "protocol": {
            "root": str(dataset_dir(root)), "split": "training", "dataset_images": len(ds),
            "first_image_size_wh": [w, h], "recipe": recipe, "crop_size": crop_size,
            "workers": workers, "batch_size": batch_size, "timed_batches": n_batches,
            "warmup_batches": warmup, "sampler": "uniform with replacement", "seed": seed,
            "pin_memory": False, "cpu_count": os.cpu_count(),
            # Other load on the machine moves these figures a lot; record it beside them.
            "load_avg_1m_before": load_before,
            "threads_per_worker": 1, "torch": torch.__version__, "opencv": cv2.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
        },
    }


def step_needs(preflight: str | Path | None = None, step_time: float | None = None,
               batch_size: int = 8) -> list[dict]:
    """Images per second one training worker consumes: per-worker batch / step time, for each
    configuration measured in a preflight's JSON (``segrepro reproduce --preflight --json``)
    and/or for ``step_time`` seconds at ``batch_size``."""
    needs = []
    if preflight is not None:
        try:
            report = json.loads(Path(preflight).read_text())
            measured = [c for c in report["configs"] if "measured" in c]
            for c in measured:
                m = c["measured"]
                needs.append({"source": f"{c['config']} (preflight)", "per_worker_batch": m["per_worker_batch"],
                              "step_s": m["step_s"], "loader_processes": m["loader_processes"]})
        except OSError as e:
            raise InputError(f"--preflight {preflight}: cannot read: {e.strerror}") from e
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"--preflight {preflight}: expected the JSON of `segrepro reproduce --preflight "
                             f"--json` (configs[].measured.per_worker_batch, step_s), got: {e!r}") from e
        if not measured:
            raise InputError(f"--preflight {preflight}: no configuration was measured in that preflight")
    if step_time is not None:
        if not step_time > 0:
            raise InputError(f"--step-time must be positive seconds, got {step_time}")
        needs.append({"source": "--step-time", "per_worker_batch": batch_size, "step_s": step_time,
                      "loader_processes": None})
    for n in needs:
        n["images_per_s"] = n["per_worker_batch"] / n["step_s"]
    return needs


def format_result(result: dict) -> str:
    p = result["protocol"]
    cpu = "" if result["cpu_ms_per_image"] is None else f"; {result['cpu_ms_per_image']:.1f} ms CPU/image"
    lines = [f"{result['images_per_s']:.1f} images/s ({result['s_per_batch'] * 1000:.0f} ms/batch); per worker "
             f"{result['images_per_s_per_worker']:.1f} images/s = {result['ms_per_image_per_worker']:.1f} ms/image "
             f"(decode + transform + collate, 1 thread{cpu}) - recipe {p['recipe']}, crop {p['crop_size']}, "
             f"{p['workers']} workers, batch {p['batch_size']}, {p['timed_batches']} timed batches after "
             f"{p['warmup_batches']} warm-up, {p['dataset_images']} images of ~{p['first_image_size_wh'][0]}x"
             f"{p['first_image_size_wh'][1]} in {p['root']}, load {p['load_avg_1m_before']:.1f} before"]
    for n in result.get("step_needs", []):
        procs = n["loader_processes"]
        if procs is None:
            have = result["images_per_s"]
            where = f"this benchmark's {p['workers']} workers give" if p["workers"] else "this benchmark's main process gives"
        else:  # the configuration's loader processes, each at this benchmark's per-worker rate
            have = result["images_per_s_per_worker"] * max(procs, 1)
            where = f"its {procs} loader processes give" if procs else "loading in the training process gives"
        verdict = "STARVED: the step waits for data" if have < n["images_per_s"] else "keeps up"
        if procs == 0:
            verdict = "serial: every step also waits for its batch"
        lines.append(f"training step, {n['source']}: needs {n['images_per_s']:.1f} images/s (batch "
                     f"{n['per_worker_batch']} / step {n['step_s']:.3f} s); {where} {have:.1f} images/s: "
                     f"{verdict}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True,
                        help=f"directory containing {DATASET_DIRNAME}, or that directory itself")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20, help="timed batches (default 20)")
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--recipe", default="reference", choices=RECIPES)
    parser.add_argument("--preflight", metavar="JSON",
                        help="output of `segrepro reproduce --preflight --json`: print each measured "
                             "configuration's need (per-worker batch / step time) beside the loader's rate")
    parser.add_argument("--step-time", type=float, metavar="SECONDS",
                        help="a training step's time: print the need batch-size / SECONDS beside the rate")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        # the need first: a bad --preflight file is reported before a long measurement
        needs = step_needs(args.preflight, args.step_time, args.batch_size)
        result = bench_pipeline(args.root, workers=args.workers, batch_size=args.batch_size,
                                n_batches=args.batches, crop_size=args.crop_size, recipe=args.recipe)
    except (ValueError, FileNotFoundError) as e:
        print(f"segrepro data bench: {e}", file=sys.stderr)
        return 2
    result["step_needs"] = needs
    print(json.dumps(result, indent=1) if args.json else format_result(result))
    return 0
