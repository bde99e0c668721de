"""kernels.device facts and the package's CPU/interpreter dispatch."""

import os
import subprocess
import sys

import pytest
import torch
from kernel_helpers import no_cuda_only, requires_cuda

import kernels
from kernels import device

UUIDS = ["GPU-aaaa-0000", "GPU-abbb-1111", "GPU-cccc-2222"]


@pytest.mark.parametrize(
    "value,want",
    [
        (None, [0, 1, 2]),
        ("2,0", [2, 0]),
        (" 1 , 2", [1, 2]),
        ("GPU-c,GPU-aa", [2, 0]),  # shortened UUIDs, as CUDA accepts them
        ("GPU-a", []),  # ambiguous prefix: invalid, and parsing stops there
        ("0,x,2", [0]),  # the first invalid entry ends the list
        ("1,7,2", [1]),  # so does an index NVML does not have
        ("1,1", []),  # a repeated device empties the list
        ("", []),
    ],
)
def test_parse_visible_devices(value, want):
    assert device.parse_visible_devices(value, UUIDS) == want


def test_parse_visible_devices_refuses_mig():
    with pytest.raises(ValueError, match="MIG"):
        device.parse_visible_devices("MIG-1234", UUIDS)


@no_cuda_only
def test_cpu_facts():
    facts = device.device_facts()
    assert facts["device_type"] == "cpu"
    assert facts["cpu_count"] == os.cpu_count()
    assert facts["torch_num_threads"] == torch.get_num_threads()
    assert facts["cpu_model"]
    assert facts["triton_version"] and facts["torch_version"] == torch.__version__
    with pytest.raises(RuntimeError, match="CUDA"):
        device.measured_peak()


@no_cuda_only
def test_package_runs_kernels_through_the_interpreter_on_cpu():
    assert kernels.mode() == "interpreter" and kernels.available()


def _fresh_python(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


@no_cuda_only
def test_import_sets_triton_interpret_when_there_is_no_gpu():
    code = ("import os, kernels; print(os.environ['TRITON_INTERPRET'], kernels.mode(), "
            "kernels.attention.__module__)")
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "interpreter", "kernels.attention"]


@no_cuda_only
def test_explicit_triton_interpret_0_without_gpu_is_unavailable_with_a_clear_error():
    code = ("import torch, kernels; print(kernels.mode(), kernels.available());"
            "x = torch.randn(1, 1, 8, 16); kernels.attention(x, x, x)")
    result = _fresh_python(code, TRITON_INTERPRET="0")
    assert result.stdout.split() == ["unavailable", "False"]
    assert "RuntimeError: Triton kernels need CUDA tensors" in result.stderr


@pytest.mark.gpu
@requires_cuda
def test_gpu_facts_and_measured_peak():
    facts = device.device_facts()
    assert facts["device_type"] == "cuda"
    assert facts["gpu_name"] == torch.cuda.get_device_name(0)
    assert facts["driver_version"] and facts["sm_clock_max_mhz"] and facts["mem_clock_max_mhz"]
    assert facts["nvml_matches_cuda"], "set CUDA_DEVICE_ORDER=PCI_BUS_ID"
    peak = device.measured_peak(torch.float16)
    assert peak["peak_matmul_tflops"] > 1 and peak["peak_copy_gb_s"] > 50
