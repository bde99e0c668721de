"""Throughput of the training input pipeline (decode + augmentation + collation).

Protocol: the training split through ``ADE20K`` + the recipe's train transform, a
DataLoader with ``workers`` processes, ``batch_size`` images a batch drawn with
replacement by a seeded sampler (so a small dataset still feeds every batch); the first
``warmup`` batches (worker start-up, first decodes) are not timed, the next ``n_batches``
are. Images per second = n_batches * batch_size / timed wall time. No model runs: this is
the rate at which the loader alone can feed a trainer.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

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
    t_start = time.perf_counter()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for batch in it:
        n += batch["image"].shape[0]
    elapsed = time.perf_counter() - t0
    with Image.open(ds.files(0)[0]) as im:
        w, h = im.size
    return {
        "images_per_s": n / elapsed,
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
            "torch_threads_main": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True,
                        help=f"directory containing {DATASET_DIRNAME}, or that directory itself")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20, help="timed batches (default 20)")
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--recipe", default="reference", choices=RECIPES)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        result = bench_pipeline(args.root, workers=args.workers, batch_size=args.batch_size,
                                n_batches=args.batches, crop_size=args.crop_size, recipe=args.recipe)
    except (ValueError, FileNotFoundError) as e:
        print(f"segrepro data bench: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        p = result["protocol"]
        print(f"{result['images_per_s']:.1f} images/s ({result['s_per_batch'] * 1000:.0f} ms/batch) - "
              f"recipe {p['recipe']}, crop {p['crop_size']}, {p['workers']} workers, batch "
              f"{p['batch_size']}, {p['timed_batches']} timed batches after {p['warmup_batches']} "
              f"warm-up, {p['dataset_images']} images of ~{p['first_image_size_wh'][0]}x"
              f"{p['first_image_size_wh'][1]} in {p['root']}")
    return 0
