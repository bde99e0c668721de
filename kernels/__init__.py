"""Fused Triton kernels for Segmenter, their PyTorch references, device facts and the profiler.

Public entries:
    attention(q, k, v, scale=None)                          # [B, H, N, D] -> [B, H, N, D]
    mask_logits(patches, classes, weight, bias, eps=1e-5)   # [B,N,D], [B,C,D] -> [B, N, C]
    available() -> bool, mode() -> "cuda" | "interpreter" | "unavailable"

CPU machines: Triton decides at decoration time whether a @triton.jit function is compiled or
interpreted, so this package sets TRITON_INTERPRET=1 (os.environ.setdefault, before importing
the kernel modules) when torch sees no CUDA device. The same Triton source then runs through
Triton's NumPy interpreter on CPU tensors: correct but slow, meant for tests and the no-GPU
profile check. The variable is process-wide, so import this package after setting
TRITON_INTERPRET yourself if you want another choice; an explicit TRITON_INTERPRET=0 on a
machine without CUDA leaves mode() == "unavailable" and the entries raise a clear error.

The function `attention` shadows its module on this package (`kernels.attention` is the
function); reach the module's other names with `from kernels.attention import ...`.
Importing this package costs only torch + triton imports: no compilation, no device work.
"""

import os
import sys

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    if "triton.language" in sys.modules:
        # triton.language's own @jit helpers were already built for compilation (timm, for
        # one, imports triton): the interpreter would fail later with a cryptic error.
        raise ImportError("kernels: no CUDA device, and triton was imported before TRITON_INTERPRET=1 was set; "
                          "set TRITON_INTERPRET=1 in the environment (or import harness or kernels first)")
    os.environ["TRITON_INTERPRET"] = "1"

from ._runtime import interpreting  # noqa: E402
from .attention import attention  # noqa: E402
from .mask_decoder import mask_logits  # noqa: E402


def mode() -> str:
    """How the kernels run in this process: "cuda", "interpreter" or "unavailable"."""
    if interpreting():
        return "interpreter"
    return "cuda" if torch.cuda.is_available() else "unavailable"


def available() -> bool:
    """True when attention() and mask_logits() can run here (GPU, or CPU via the interpreter)."""
    return mode() != "unavailable"


__all__ = ["attention", "available", "mask_logits", "mode"]
