"""How the Triton kernels run here: compiled for a CUDA GPU, or through Triton's interpreter.

Shared by the kernel files so each of them picks its launch configurations and precisions the
same way. Imports nothing heavier than torch and triton.
"""

from __future__ import annotations

import contextlib

import torch
import triton


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1, i.e. @triton.jit functions run as NumPy on the host.

    Triton reads the variable when a function is decorated, so the answer only describes the
    kernel modules if it was already set when they were imported (see kernels/__init__.py).
    """
    return bool(triton.knobs.runtime.interpret)


def upcast_tiles(dtype: torch.dtype) -> bool:
    """Whether kernels must cast loaded tiles to fp32 before doing arithmetic on them.

    The interpreter stores bf16 as uint16 bit patterns and its tl.dot multiplies those patterns
    (triton-lang/triton#11584), so bf16 tiles are widened there. fp16 needs nothing: the
    interpreter's dot accumulates fp16 operands in fp32, as the GPU does.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for fp32 operands, following torch's own matmul setting.

    torch.get_float32_matmul_precision() == "highest" (torch's default) means fp32 matmuls are
    exact IEEE products, so the kernel does the same; "high"/"medium" allow TF32, and so do we.
    The option is ignored for fp16/bf16 operands.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def autotune_configs(low: list[dict], fp32: list[dict], interp: dict, dtype_arg: str) -> dict:
    """Keyword arguments for @triton.autotune: each input dtype its own config list.

    Each config is a dict of the kernel's block sizes plus num_warps and num_stages. fp32 tiles
    hold twice the bytes, and an exact ("ieee") fp32 tl.dot runs on the CUDA cores with its
    operands in registers, so fp32 gets smaller tiles: the configs that keep fp16/bf16 fast would
    spill (kernels.compile checks that none of the low-precision configs, and at least one fp32
    config, compile without spills). The autotuner's early prune keeps the list of the dtype
    of argument ``dtype_arg``; kernels.compile applies the same prune.

    Under the interpreter there is nothing to tune and every extra config costs a full run, so
    the single ``interp`` config is used.
    """
    def make(spec: dict) -> triton.Config:
        spec = dict(spec)
        return triton.Config(spec, num_warps=spec.pop("num_warps"), num_stages=spec.pop("num_stages", 2))

    if interpreting():
        return {"configs": [make({"num_warps": 1, **interp})]}
    low_configs, fp32_configs = [make(c) for c in low], [make(c) for c in fp32]

    def by_dtype(configs, named_args, **kwargs):
        wanted = fp32_configs if named_args[dtype_arg].dtype == torch.float32 else low_configs
        return [c for c in configs if any(c is w for w in wanted)]

    return {"configs": low_configs + fp32_configs, "prune_configs_by": {"early_config_prune": by_dtype}}


def check_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the tensors cannot go to the kernels in this mode."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    # meta tensors reach only the custom ops' fake implementations (shapes, FLOP counts)
    if device.type in ("cuda", "meta") or (device.type == "cpu" and interpreting()):
        return
    raise RuntimeError(
        f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; got {device}"
        f" with TRITON_INTERPRET={'1' if interpreting() else 'unset/0'}"
    )


def on_device(t: torch.Tensor):
    """Make t's GPU current: Triton launches on the current device, not on the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
