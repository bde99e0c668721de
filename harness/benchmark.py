"""Throughput of a zoo model: forward images per second and latency, one full sliding-window
evaluation of an ADE-sized image, FLOPs, parameters, peak memory, and the device facts; and
training throughput: iterations of the training loop's own step at the configuration's crop,
per-worker batch and precision, their latency and the peak memory of training.

Protocol as timm's ``benchmark.py`` and MMSegmentation's ``tools/analysis_tools/benchmark.py``:
``cudnn.benchmark`` on, warm-up runs discarded, every run timed on its own with the device
synchronised, the median reported. Every figure carries the protocol that produced it,
including the torch threads used and any concurrent load seen while timing: CPU time other
processes on the machine used meanwhile, the 1-minute load average, and other processes holding
a context on the GPU, summed up in a verdict (``concurrent_load``: "none detected", or what was seen).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import resource
import statistics
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from harness.config import Config, InputError
from harness.inference import slide_inference
from harness.models import build_model, count_parameters, load_checkpoint
from kernels.device import device_facts

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# other processes' CPU use below this many cores on average is background (Ray's daemons, the
# system's), not load that could move a figure
LOAD_THRESHOLD_CORES = 0.2
BUSIEST_SHOWN = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def time_runs(fn, device: torch.device, warmup: int, repeats: int, on_run=None) -> list[float]:
    """Seconds of each of ``repeats`` runs after ``warmup`` discarded ones; ``on_run()`` after
    every run, warm-up included (progress)."""
    for _ in range(warmup):
        fn()
        if on_run:
            on_run()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if on_run:
            on_run()
    return times


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA allocator peak"
    # ru_maxrss is in KiB on Linux: the whole process's peak resident set
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def _cpu_seconds() -> dict[tuple[int, int], tuple[str, float]] | None:
    """(pid, start time) -> (name, CPU seconds used so far) of every process in /proc, which
    are those of this machine (or container) that could compete for its cores; None without
    /proc. The start time tells a reused pid apart."""
    if not os.path.isdir("/proc"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # ended since the listing
            continue
        # the name is in parentheses and may hold spaces or parentheses itself
        end = stat.rindex(b")")
        fields = stat[end + 2:].split()  # fields[0] is proc(5)'s field 3
        out[(int(entry.name), int(fields[19]))] = (stat[stat.index(b"(") + 1:end].decode(errors="replace"),
                                                   (int(fields[11]) + int(fields[12])) / tick)
    return out


def _other_gpu_processes(device: torch.device) -> int | None:
    """Processes other than this one holding a context on ``device`` (busy or idle: NVML does not
    tell them apart portably); None where NVML cannot say."""
    import pynvml

    from kernels.device import nvml_index

    try:
        index = nvml_index(device.index or 0)
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pids = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        finally:
            pynvml.nvmlShutdown()
    except (ValueError, pynvml.NVMLError):  # a MIG device, no NVML
        return None
    # in a container NVML gives the host's pids: this process is then among them under another
    return len(pids - {os.getpid()}) if os.getpid() in pids else max(len(pids) - 1, 0)


@contextlib.contextmanager
def concurrent_load(device: torch.device):
    """Yields a dict that holds, once the block has run, what else used the machine meanwhile:
    ``from``/``to`` (epoch seconds), ``other_cpu_s`` and ``other_cores`` (CPU time of every
    other process, and that over the wall time; a process that ended within the block is not
    seen), the ``busiest`` of them, ``loadavg_1m`` at the end and, on a GPU,
    ``gpu_other_processes`` at the end."""
    load = {}
    before, start = _cpu_seconds(), time.time()
    yield load
    end, after = time.time(), _cpu_seconds()
    load.update({"from": start, "to": end, "other_cpu_s": None, "other_cores": None, "busiest": []})
    if before is not None and after is not None:
        used = sorted(((cpu - before.get(key, ("", 0.0))[1], name, key[0]) for key, (name, cpu) in after.items()
                       if key[0] != os.getpid()), reverse=True)
        load["other_cpu_s"] = sum(u[0] for u in used)
        load["other_cores"] = load["other_cpu_s"] / (end - start)
        load["busiest"] = [{"process": name, "pid": pid, "cpu_s": cpu}
                           for cpu, name, pid in used[:BUSIEST_SHOWN] if cpu > 0]
    load["loadavg_1m"] = os.getloadavg()[0]
    load["gpu_other_processes"] = _other_gpu_processes(device) if device.type == "cuda" else None


def load_verdict(load: dict) -> str:
    """"none detected", or a short description of the concurrent load in ``load``."""
    seen = []
    if load["other_cores"] is None:
        seen.append("CPU use of other processes not measured (no /proc)")
    elif load["other_cores"] >= LOAD_THRESHOLD_CORES:
        busiest = ", ".join(f"{p['process']} (pid {p['pid']}) {p['cpu_s']:.2f} CPU-s" for p in load["busiest"])
        seen.append(f"other processes used {load['other_cores']:.2f} cores on average: {busiest}")
    if load["gpu_other_processes"]:
        seen.append(f"{load['gpu_other_processes']} other process(es) holding a context on the GPU")
    return "; ".join(seen) or "none detected"


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def benchmark(cfg: Config, checkpoint: str | None = None, batch_size: int = 1, image_size: int | None = None,
              precision: str = "fp32", attention: str | None = None, warmup: int = 5, repeats: int = 30,
              slide_repeats: int | None = None, device: str | None = None, on_run=None) -> dict:
    """``on_run(done, total)`` after every timed or warm-up run (progress)."""
    device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = {"attention": attention, "mask_step": attention} if attention else {}
    if checkpoint:
        model, _ = load_checkpoint(checkpoint, **overrides)
    else:
        # throughput does not depend on the weights: a freshly initialised model times the same
        model_cfg = cfg.model if not overrides else type(cfg.model)(**{**cfg.model.__dict__, **overrides})
        model = build_model(model_cfg).eval()
    model.to(device_t)
    size = image_size or cfg.eval.window
    if device_t.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device_t)
    x = torch.randn(batch_size, 3, size, size, device=device_t)
    # an ADE20K-sized image at the test scale (ADE20K images are mostly 4:3 landscape)
    ade = torch.randn(1, 3, cfg.data.test_scale, round(cfg.data.test_scale * 4 / 3), device=device_t)

    slide_warmup, slide_repeats = min(warmup, 2), slide_repeats or max(repeats // 5, 3)
    total, done = warmup + repeats + slide_warmup + slide_repeats, itertools.count(1)
    step = (lambda: on_run(next(done), total)) if on_run else None
    with torch.no_grad(), _autocast(device_t, precision), concurrent_load(device_t) as load:
        forward = time_runs(lambda: model(x), device_t, warmup, repeats, step)
        slide = time_runs(lambda: slide_inference(model, [ade], [False], tuple(ade.shape[-2:]), cfg.eval.window,
                                                  cfg.eval.stride, cfg.eval.batch_size, cfg.eval.small_views),
                          device_t, slide_warmup, slide_repeats, step)
    memory, memory_kind = peak_memory_mb(device_t)
    flops = count_flops(model, x[:1])
    median = statistics.median(forward)
    protocol = {
        "batch_size": batch_size, "precision": precision, "image_size": size,
        "attention": attention or cfg.model.attention, "warmup": warmup, "repeats": repeats,
        "slide_image": list(ade.shape[-2:]), "window": cfg.eval.window, "stride": cfg.eval.stride,
        "device": str(device_t),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device_t.type == "cuda" else None,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32 if device_t.type == "cuda" else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark if device_t.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "load": load,
        "concurrent_load": load_verdict(load),
    }
    return {
        "config": cfg.name,
        "images_per_s": batch_size / median,
        "latency_median_ms": median * 1e3,
        "latency_p90_ms": _percentile(forward, 90) * 1e3,
        "slide_latency_median_ms": statistics.median(slide) * 1e3,
        "slide_images_per_s": 1 / statistics.median(slide),
        "gflops": flops / 1e9,
        "params_m": count_parameters(model) / 1e6,
        "peak_memory_mb": memory,
        "peak_memory_kind": memory_kind,
        "protocol": protocol,
        "device_facts": device_facts(device_t.index or 0),
    }


def _load_and_device_lines(r: dict) -> list[str]:
    load = r["protocol"]["load"]
    return [f"  concurrent load while timing: {r['protocol']['concurrent_load']} "
            f"(1-min load average {load['loadavg_1m']:.2f})",
            "  " + ", ".join(f"{k} {v}" for k, v in r["device_facts"].items() if v is not None)]


def format_result(r: dict) -> str:
    p = r["protocol"]
    lines = [
        f"{r['config']}: {r['images_per_s']:.2f} img/s, latency median {r['latency_median_ms']:.1f} ms, "
        f"p90 {r['latency_p90_ms']:.1f} ms (forward, batch {p['batch_size']}, {p['image_size']}x{p['image_size']}, "
        f"{p['precision']}, attention {p['attention']})",
        f"  sliding window on {p['slide_image'][0]}x{p['slide_image'][1]} (window {p['window']}, stride {p['stride']}): "
        f"{r['slide_latency_median_ms']:.1f} ms per image",
        f"  {r['gflops']:.1f} GFLOPs per image, {r['params_m']:.2f} M parameters, "
        f"peak memory {r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']})",
        f"  device {p['device']}, warm-up {p['warmup']}, repeats {p['repeats']}, "
        # TF32 and cuDNN settings exist on CUDA only (None elsewhere)
        + (f"TF32 matmul {p['tf32_matmul']}, TF32 cudnn {p['tf32_cudnn']}, cudnn.benchmark {p['cudnn_benchmark']}, "
           if p['tf32_matmul'] is not None else "")
        + f"threads {p['threads']}",
        f"  concurrent load while timing: {p['concurrent_load']} (1-min load average {p['load']['loadavg_1m']:.2f})",
    ]
    return "\n".join(lines + _load_and_device_lines(r))


# ---------------------------------------------------------------- training

TRAIN_DATA = "random tensors of the crop shape, already on the device (the loader: segrepro data bench)"
TRAIN_STEP = "forward, loss, backward, optimizer and schedule step (harness.train.loop.train_step), synchronised"


def _reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: the CUDA allocator's, or this process's resident high-water mark (Linux
    resets it to the current resident set); False where it could not (the peak then stays the
    process's lifetime one)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _proc_status_mb(field: str) -> float | None:
    """A memory field (kB) of /proc/self/status in MB; None without it."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    return None


def _memory_now_mb(device: torch.device) -> float | None:
    """What the peak starts from: the allocator's live memory, or this process's resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _proc_status_mb("VmRSS")


def _peak_memory_since_reset(device: torch.device, reset: bool) -> tuple[float, str]:
    peak = _proc_status_mb("VmHWM") if device.type == "cpu" and reset else None
    return (peak, "process peak RSS while timing (VmHWM)") if peak is not None else peak_memory_mb(device)


def train_batch_size(cfg: Config, workers: int = 1) -> int:
    """The per-worker batch of ``cfg`` trained by ``workers`` workers."""
    if workers < 1 or cfg.optim.batch_size % workers:
        raise InputError(f"--workers {workers}: must be a positive divisor of {cfg.name}'s global batch "
                         f"optim.batch_size {cfg.optim.batch_size}")
    return cfg.optim.batch_size // workers


def train_step_fn(cfg: Config, device: torch.device, batch_size: int, seed: int = 0):
    """``(step, training)``: ``step()`` runs one training iteration of ``cfg`` on one random
    batch of ``batch_size`` crops, built as the training loop builds it (``build_training``)."""
    from harness.train.loop import build_training, train_step

    training = build_training(cfg, device)
    training.model.train()
    crop = cfg.data.crop_size
    gen = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(batch_size, 3, crop, crop, generator=gen).to(device),
             "label": torch.randint(0, cfg.model.n_cls, (batch_size, crop, crop), generator=gen).to(device)}

    def step() -> float:
        return train_step(training.model, training.model, batch, training.optimizer, training.scheduler,
                          training.scaler, training.amp, cfg, device)
    return step, training


def benchmark_train(cfg: Config, batch_size: int | None = None, workers: int = 1, warmup: int = 5,
                    repeats: int = 30, device: str | None = None, on_run=None) -> dict:
    """Training iterations of ``cfg`` at its crop, per-worker batch (``batch_size``, or the
    global batch over ``workers``) and precision (``optim.amp``; CPUs train in fp32 as the loop
    does): images/s, step latency and the peak memory of training, with the protocol.
    ``on_run(done, total)`` after every step, warm-up included (progress)."""
    device_t = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = batch_size or train_batch_size(cfg, workers)
    step, training = train_step_fn(cfg, device_t, batch)
    _sync(device_t)
    reset = _reset_peak_memory(device_t)
    # model, gradients' and optimiser's state and, on a CPU, the process itself (libraries,
    # interpreter): the peak less this is what the steps' activations added
    memory_start = _memory_now_mb(device_t)
    with concurrent_load(device_t) as load:
        done = itertools.count(1)
        times = time_runs(step, device_t, warmup, repeats,
                          (lambda: on_run(next(done), warmup + repeats)) if on_run else None)
    memory, memory_kind = _peak_memory_since_reset(device_t, reset)
    median = statistics.median(times)
    protocol = {
        "crop": cfg.data.crop_size, "batch_size": batch, "workers": None if batch_size else workers,
        "global_batch_size": cfg.optim.batch_size,
        "precision": cfg.optim.amp if training.amp is not None else "fp32", "precision_configured": cfg.optim.amp,
        "recipe": cfg.recipe, "optimizer": type(training.optimizer).__name__, "clip_grad": cfg.optim.clip_grad,
        "warmup": warmup, "repeats": repeats,
        "step": TRAIN_STEP, "data": TRAIN_DATA,
        "device": str(device_t),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device_t.type == "cuda" else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark if device_t.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "load": load,
        "concurrent_load": load_verdict(load),
        "peak_memory_kind": memory_kind,
        "memory_at_start_mb": memory_start,
    }
    return {
        "config": cfg.name,
        "images_per_s": batch / median,
        "step_median_ms": median * 1e3,
        "step_p90_ms": _percentile(times, 90) * 1e3,
        "peak_memory_mb": memory,
        "peak_memory_kind": memory_kind,
        "params_m": count_parameters(training.model) / 1e6,
        "protocol": protocol,
        "device_facts": device_facts(device_t.index or 0),
    }


def _fmt_mb(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f} MB"


def format_train_result(r: dict) -> str:
    p = r["protocol"]
    precision = p["precision"] + (f" (configured {p['precision_configured']})"
                                  if p["precision"] != p["precision_configured"] else "")
    lines = [
        f"{r['config']} training: {r['images_per_s']:.2f} img/s, step median {r['step_median_ms']:.1f} ms, "
        f"p90 {r['step_p90_ms']:.1f} ms (batch {p['batch_size']} per worker, crop {p['crop']}x{p['crop']}, "
        f"{precision})",
        f"  peak memory {r['peak_memory_mb']:.0f} MB ({r['peak_memory_kind']}; "
        f"{_fmt_mb(p['memory_at_start_mb'])} before the first step), {r['params_m']:.2f} M parameters",
        f"  step: {p['step']}; data: {p['data']}",
        f"  device {p['device']}, warm-up {p['warmup']}, repeats {p['repeats']}, "
        + (f"TF32 matmul {p['tf32_matmul']}, cudnn.benchmark {p['cudnn_benchmark']}, "
           if p['tf32_matmul'] is not None else "")  # CUDA settings: None elsewhere
        + f"threads {p['threads']}",
    ]
    return "\n".join(lines + _load_and_device_lines(r))
