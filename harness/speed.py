"""``segrepro bench --suite inference``: the evaluation's inference workloads timed on the CPU, with
the protocol printed beside the figures so they can be rerun and set beside another
implementation timed the same way (random weights of the zoo shapes: speed does not depend on them).

Workloads per configuration:
  forward  one forward of a [1, 3, window, window] batch (logits upsampled to the input);
  slide    the single-scale sliding-window inference of one image (its test-resized view);
  msflip   the multi-scale+flip inference of the same image (every scale, mirrored too).
The views are built before the timing; ``slide`` and ``msflip`` time ``slide_inference`` from
the views to the class probabilities at the image's size. Medians of ``repeats`` runs after
``warmup`` discarded ones, each run timed on its own.
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from harness.benchmark import concurrent_load, load_verdict, time_runs
from harness.config import NORMALIZATION, Config, InputError, load_config, normalization_name
from harness.inference import keep_freed_memory, make_views, slide_inference, upsample_to_window, window_origins
from harness.models.segmenter import build_model

WORKS = ("forward", "slide", "msflip")


def _windows(views: list[torch.Tensor], window: int, stride: int) -> int:
    n = 0
    for v in views:
        H, W = upsample_to_window(v, window).shape[-2:]
        n += len(window_origins(H, window, stride)) * len(window_origins(W, window, stride))
    return n


def workloads(cfg: Config, image_hw: tuple[int, int], seed: int = 0) -> dict[str, tuple[Callable, dict]]:
    """Each work's callable and what it does (input sizes, views, windows)."""
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    e, window = cfg.eval, cfg.eval.window
    stats = NORMALIZATION[normalization_name(e.normalization, cfg.model)]
    image = torch.randint(0, 256, (3, *image_hw), dtype=torch.uint8)
    x = torch.randn(1, 3, window, window)
    out = {"forward": (lambda: model(x), {"input": [1, 3, window, window]})}
    for work, scales, flip in (("slide", (1.0,), False), ("msflip", tuple(e.scales), e.flip)):
        views, flipped = make_views(image, cfg.data.test_scale, stats["mean"], stats["std"], scales, flip,
                                    e.resize, e.ratio_base if work == "msflip" else "test_scale")
        run = (lambda v=views, f=flipped: slide_inference(model, v, f, image_hw, window, e.stride,
                                                          e.batch_size, e.small_views))
        out[work] = (run, {"image": list(image_hw), "views": [list(v.shape[-2:]) for v in views],
                           "windows": _windows(views, window, e.stride), "window": window,
                           "stride": e.stride, "batch_size": e.batch_size})
    return out


def run_suite(configs: list[str], works: list[str], image_hw: tuple[int, int] = (512, 683), threads: int = 2,
              warmup: int = 1, repeats: int = 5) -> dict:
    unknown = [w for w in works if w not in WORKS]
    if unknown:
        raise InputError(f"--works {','.join(unknown)}: expected some of {','.join(WORKS)}")
    torch.set_num_threads(threads)
    heap = keep_freed_memory()  # as `segrepro eval` runs inference
    device = torch.device("cpu")
    rows = []
    for name in configs:
        cfg = load_config(name)
        jobs = workloads(cfg, image_hw)
        for work in works:
            fn, what = jobs[work]
            with torch.no_grad(), concurrent_load(device) as load:
                times = time_runs(fn, device, warmup, repeats)
            rows.append({"config": name, "work": work, "median_ms": 1000 * statistics.median(times),
                         "min_ms": 1000 * min(times), "runs_ms": [round(1000 * t, 1) for t in times],
                         **what, "concurrent_load": load_verdict(load)})
    return {"suite": "inference", "device": "cpu", "precision": "fp32", "threads": threads,
            "torch": torch.__version__, "freed_memory_kept": heap, "warmup": warmup, "repeats": repeats, "weights": "random",
            "rows": rows}


def format_suite(result: dict) -> str:
    lines = [f"inference suite: {result['device']}, {result['precision']}, {result['threads']} threads, "
             f"torch {result['torch']}, {result['weights']} weights, freed memory kept {result['freed_memory_kept']}, median of {result['repeats']} runs "
             f"after {result['warmup']} warm-up"]
    for r in result["rows"]:
        if r["work"] == "forward":
            what = "input " + "x".join(map(str, r["input"]))
        else:
            what = (f"image {r['image'][0]}x{r['image'][1]}, {len(r['views'])} views, {r['windows']} windows "
                    f"{r['window']}/{r['stride']}, batch {r['batch_size']}")
        lines.append(f"  {r['config']:<16} {r['work']:<8} {r['median_ms']:>10.1f} ms  (min {r['min_ms']:.1f})  "
                     f"{what}; load: {r['concurrent_load']}")
    return "\n".join(lines)
