"""Constants shared by the kernel tests (a module of its own: test files cannot import conftest)."""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
no_cuda_only = pytest.mark.skipif(HAS_CUDA, reason="tests the no-GPU (interpreter) path")
every_dtype = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                                      ids=lambda d: str(d).removeprefix("torch."))

# (atol, rtol) for kernel vs an fp32 reference fed the same low-precision inputs: fp32 is
# ~1e-6 off in practice (different summation order), fp16 ~5e-4, bf16 ~1e-2.
TOLERANCE = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def gpu_tolerance_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose TOLERANCE a compiled kernel is held to: fp32 may run as TF32 where torch
    allows it (float32_matmul_precision below "highest"), and is then held to fp16's."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return torch.float16
    return dtype
