"""Fixtures for the kernel tests.

Without CUDA the kernels run under Triton's interpreter on CPU tensors; TRITON_INTERPRET must
be set before any kernels module is imported (kernels/__init__.py does it too, and so does
tests/conftest.py; repeating it here keeps this directory runnable on its own).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_helpers import HAS_CUDA, TOLERANCE  # noqa: E402

_ERRORS: list[tuple[str, str, str, float]] = []


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def check_close(request):
    """assert_close(got, want) at the dtype's tolerance, recording the max abs error."""

    def check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale=1.0):
        atol, rtol = TOLERANCE[dtype]
        got, want = got.float().cpu(), want.float().cpu()
        err = (got - want).abs().max().item()
        _ERRORS.append((request.node.name, str(dtype).removeprefix("torch."), name, err))
        torch.testing.assert_close(
            got, want, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}"
        )

    return check


def pytest_terminal_summary(terminalreporter):
    if not _ERRORS:
        return
    terminalreporter.section("kernel max abs errors vs reference")
    for test, dtype, name, err in _ERRORS:
        terminalreporter.write_line(f"{test:60s} {dtype:9s} {name:10s} {err:.3e}")
