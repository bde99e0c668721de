"""Constants shared by the kernel tests (a module of its own: test files cannot import conftest)."""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
no_cuda_only = pytest.mark.skipif(HAS_CUDA, reason="tests the no-GPU (interpreter) path")

# (atol, rtol) for kernel vs an fp32 reference fed the same low-precision inputs: fp32 is
# ~1e-6 off in practice (different summation order), fp16 ~5e-4, bf16 ~1e-2.
TOLERANCE = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
