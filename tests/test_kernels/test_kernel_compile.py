"""Every kernel compiles for sm_80 and sm_90 without register spills (`segrepro kernels compile`).

The real Triton compiler (triton.compile for a GPUTarget, ptxas, cuobjdump): no GPU needed.
Compiling every config takes a few minutes of CPU the first time; Triton's on-disk cache makes
later runs take seconds, so the compilation is shared by the tests below.
"""

import json
import os

import pytest

from kernels import compile as kernels_compile

TARGETS = [80, 90]


@pytest.fixture(scope="module")
def rows():
    return kernels_compile.compile_all(TARGETS, list(kernels_compile.DTYPES), jobs=os.cpu_count() or 1)


def test_no_fp16_bf16_config_spills_and_every_fp32_kernel_has_a_clean_config(rows):
    kernels = {r["kernel"] for r in rows}
    # every kernel of both files, in every dtype, on both targets
    assert len(kernels) == 8
    assert {(r["kernel"], r["dtype"], r["target"]) for r in rows} == {
        (k, d, f"sm_{t}") for k in kernels for d in kernels_compile.DTYPES for t in TARGETS}
    assert all(r["registers"] > 0 and r["shared_bytes"] >= 0 for r in rows)
    assert kernels_compile.problems(rows) == []


def test_problems_names_spilling_configs():
    row = {"kernel": "k", "config": "BLOCK=64,w4,s3", "target": "sm_80", "registers": 255, "shared_bytes": 0}
    rows = [{**row, "dtype": "fp16", "spill_bytes": 400},
            {**row, "dtype": "fp32", "spill_bytes": 8}, {**row, "dtype": "fp32", "spill_bytes": 0, "config": "x"},
            {**row, "dtype": "bf16", "spill_bytes": 0}, {**row, "dtype": "fp32", "spill_bytes": 16, "target": "sm_90"}]
    assert kernels_compile.problems(rows) == ["k [BLOCK=64,w4,s3] fp16 sm_80 spills 400 bytes",
                                             "k fp32 sm_90: every config spills"]


def test_command_prints_the_rows_as_json(rows, segrepro):
    # Compiled by the fixture already: served from Triton's cache.
    result = segrepro("kernels", "compile", "--target", "sm_80", "--dtype", "fp16", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["problems"] == []
    fp16 = [r for r in rows if r["dtype"] == "fp16" and r["target"] == "sm_80"]
    assert out["rows"] == fp16


@pytest.mark.parametrize("option,value", [("--target", "sm_7x"), ("--target", "sm_70"), ("--dtype", "fp8")])
def test_bad_options_exit_2(segrepro, option, value):
    result = segrepro("kernels", "compile", option, value)
    assert result.returncode == 2
    assert value in result.stderr
