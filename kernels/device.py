"""Facts about the device kernels run on, and its measured peak, as plain dicts.

Used by `segrepro kernels profile` and by the harness's throughput benchmark so that every
timing is stored beside the GPU (name, driver, clocks, power limit) or CPU that produced it.
GPU facts come from NVML (`pynvml`, package nvidia-ml-py); without a GPU, from /proc/cpuinfo.
"""

from __future__ import annotations

import os
import platform

import torch
import triton


def parse_visible_devices(value: str | None, nvml_uuids: list[str]) -> list[int]:
    """NVML indices of the CUDA devices 0, 1, ... named by a CUDA_VISIBLE_DEVICES value.

    Follows the CUDA runtime's rules, as torch.cuda._parse_visible_devices does: entries are
    comma-separated integers or (possibly shortened) UUIDs starting "GPU-"; parsing stops at
    the first entry that is not valid; a repeated device makes the list empty. None (variable
    unset) means every device in NVML order. UUIDs are resolved against `nvml_uuids` (the
    UUIDs in NVML index order); an ambiguous or unknown UUID prefix, or an index NVML does not
    have, is invalid. MIG instances are not mapped: a "MIG-" entry raises ValueError (NVML
    clocks and power belong to the parent GPU anyway).
    """
    if value is None:
        return list(range(len(nvml_uuids)))
    indices: list[int] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.startswith("MIG-"):
            raise ValueError(f"CUDA_VISIBLE_DEVICES entry {entry!r}: MIG devices are not mapped")
        if entry.startswith("GPU-"):
            matches = [i for i, uuid in enumerate(nvml_uuids) if uuid.startswith(entry)]
            if len(matches) != 1:
                break
            index = matches[0]
        else:
            digits = entry[: len(entry) - len(entry.lstrip("0123456789"))]
            if not digits:
                break
            index = int(digits)
            if index >= len(nvml_uuids):
                break
        if index in indices:
            return []
        indices.append(index)
    return indices


def nvml_index(cuda_index: int = 0) -> int:
    """NVML index of torch's cuda:<cuda_index>, taking CUDA_VISIBLE_DEVICES into account.

    Assumes CUDA enumerates devices in NVML's (PCI bus) order, which holds when
    CUDA_DEVICE_ORDER=PCI_BUS_ID and on single-model machines; gpu_facts() cross-checks the
    result by comparing the PCI bus id torch reports with NVML's.
    """
    import pynvml

    pynvml.nvmlInit()
    try:
        uuids = [
            pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
            for i in range(pynvml.nvmlDeviceGetCount())
        ]
    finally:
        pynvml.nvmlShutdown()
    visible = parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
    if not 0 <= cuda_index < len(visible):
        raise ValueError(
            f"cuda:{cuda_index} is not visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r} -> NVML indices {visible})"
        )
    return visible[cuda_index]


def cpu_facts() -> dict:
    """CPU model and thread counts (what bounds interpreter runs and CPU baselines)."""
    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "device_type": "cpu",
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_num_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def gpu_facts(cuda_index: int = 0) -> dict:
    """Name, driver, SM/memory clocks (current and max), power, memory of cuda:<cuda_index>.

    NVML fields a device does not support are None rather than an error.
    """
    import pynvml

    props = torch.cuda.get_device_properties(cuda_index)
    facts = {
        "device_type": "cuda",
        "cuda_index": cuda_index,
        "gpu_name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_total_gb": round(props.total_memory / 1e9, 3),
        "cuda_runtime": torch.version.cuda,
    }
    index = nvml_index(cuda_index)
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)

        def query(fn, *args, scale=1.0):
            try:
                value = fn(*args)
            except pynvml.NVMLError:
                return None
            return value * scale if isinstance(value, (int, float)) and scale != 1.0 else value

        pci = query(pynvml.nvmlDeviceGetPciInfo, handle)
        facts.update({
            "nvml_index": index,
            "gpu_uuid": query(pynvml.nvmlDeviceGetUUID, handle),
            "pci_bus_id": pci.busId if pci is not None else None,
            "driver_version": query(pynvml.nvmlSystemGetDriverVersion),
            "sm_clock_mhz": query(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": query(pynvml.nvmlDeviceGetMaxClockInfo, handle,
                                      pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": query(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_MEM),
            "mem_clock_max_mhz": query(pynvml.nvmlDeviceGetMaxClockInfo, handle,
                                       pynvml.NVML_CLOCK_MEM),
            # NVML reports milliwatts.
            "power_limit_w": query(pynvml.nvmlDeviceGetPowerManagementLimit, handle, scale=1e-3),
            "power_enforced_limit_w": query(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle,
                                            scale=1e-3),
            "power_draw_w": query(pynvml.nvmlDeviceGetPowerUsage, handle, scale=1e-3),
        })
    finally:
        pynvml.nvmlShutdown()
    if isinstance(facts["pci_bus_id"], bytes):
        facts["pci_bus_id"] = facts["pci_bus_id"].decode()
    torch_bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}"
    # A mismatch means CUDA and NVML order devices differently (set CUDA_DEVICE_ORDER=PCI_BUS_ID).
    facts["nvml_matches_cuda"] = (
        facts["pci_bus_id"] is not None and facts["pci_bus_id"].lower().startswith(torch_bus)
    )
    return facts


def device_facts(cuda_index: int = 0) -> dict:
    """gpu_facts() when CUDA is available, else cpu_facts(); both with software versions."""
    facts = gpu_facts(cuda_index) if torch.cuda.is_available() else cpu_facts()
    facts.update({
        "torch_version": torch.__version__,
        "triton_version": triton.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    })
    return facts


def measured_peak(dtype: torch.dtype = torch.float16, cuda_index: int = 0) -> dict:
    """The device's measured peak: dense matmul TFLOP/s in `dtype` and device-copy GB/s.

    Timed with triton.testing.do_bench (median), so kernel timings can be reported as a
    fraction of what this GPU actually reaches rather than of a datasheet figure. fp32 obeys
    torch.get_float32_matmul_precision(), as the kernels do. Needs a CUDA GPU.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("measured_peak needs a CUDA GPU; none is available")
    from triton.testing import do_bench

    device = torch.device("cuda", cuda_index)
    with torch.cuda.device(device):
        n = 8192
        a = torch.randn((n, n), device=device, dtype=dtype)
        b = torch.randn((n, n), device=device, dtype=dtype)
        c = torch.empty((n, n), device=device, dtype=dtype)
        mm_ms = do_bench(lambda: torch.mm(a, b, out=c), return_mode="median")
        del a, b, c
        # 1 GiB source: far beyond any L2, so the copy runs at DRAM bandwidth.
        src = torch.empty(1 << 30, device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)
        cp_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
        nbytes = src.numel()
        del src, dst
        torch.cuda.empty_cache()
    return {
        "peak_dtype": str(dtype).removeprefix("torch."),
        "peak_matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        # A copy reads and writes every byte.
        "peak_copy_gb_s": 2 * nbytes / (cp_ms * 1e-3) / 1e9,
    }
