"""The command line's global flags and the refusals and notes that need no Ray or store."""
import re

import pytest
import yaml

from harness.benchmark import format_result
from harness.config import read_yaml
from harness.errors import classify
from harness.reproduce import resolve_configs


def test_version_names_the_package_version(segrepro):
    import importlib.metadata

    res = segrepro("--version")
    assert res.returncode == 0
    assert res.stdout.startswith(f"segrepro {importlib.metadata.version('segrepro')}")
    assert re.search(r"\(commit [0-9a-f]{7,}", res.stdout)  # the tests run from a git checkout


@pytest.mark.parametrize("extra, message", [(["--limit", "0"], "--limit 0: must be at least 1"),
                                            (["--workers", "0"], "--workers 0: must be at least 1")])
def test_eval_refuses_counts_below_one(segrepro, tmp_path, extra, message):
    res = segrepro("eval", "--checkpoint", tmp_path / "none.pth", "--data-root", tmp_path, *extra)
    assert res.returncode == 2
    assert [line for line in res.stderr.splitlines() if line.startswith("segrepro: error")] == [
        f"segrepro: error: {message}"]


def test_an_internal_failure_is_one_line_and_the_traceback_goes_to_the_log(segrepro, tmp_path, monkeypatch):
    import harness.zoo

    def broken():
        raise KeyError("x")

    monkeypatch.setenv("SEGREPRO_CACHE", str(tmp_path))  # no run directory: the log lives in the cache
    monkeypatch.setattr(harness.zoo, "zoo_table", broken)
    res = segrepro("zoo")
    log = tmp_path / "logs" / "segrepro.log"
    assert res.returncode == 1
    assert res.stderr.splitlines() == ["segrepro: error: internal error: KeyError: 'x'",
                                       f"segrepro: full traceback in {log} (--debug prints it here)"]
    assert "Traceback (most recent call last)" in log.read_text() and "segrepro zoo" in log.read_text()
    res = segrepro("--debug", "zoo")
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr


def test_store_failures_are_the_users_to_fix():
    code, message = classify(RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database"))
    assert code == 2 and "readonly database" in message and "writable" in message


def test_repeated_configs_run_once_with_a_note(capsys):
    assert resolve_configs("seg_tiny_mask,seg_small_mask,seg_tiny_mask") == ["seg_tiny_mask", "seg_small_mask"]
    assert "seg_tiny_mask more than once" in capsys.readouterr().err
    assert resolve_configs("seg_tiny_mask") == ["seg_tiny_mask"]
    assert capsys.readouterr().err == ""


def test_yaml_12_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nmin: -2E+2\nplain: 1.0e-5\nn: 10\nname: 1e3x\n")
    assert yaml.safe_load(path.read_text())["lr"] == "1e-3"  # what YAML 1.1 makes of it
    assert read_yaml(path) == {"lr": 1e-3, "min": -200.0, "plain": 1e-5, "n": 10, "name": "1e3x"}


def test_bench_on_cpu_names_no_cuda_settings():
    protocol = {"batch_size": 1, "image_size": 64, "precision": "fp32", "attention": "torch", "slide_image": [64, 80],
                "window": 64, "stride": 48, "device": "cpu", "warmup": 1, "repeats": 2, "threads": 2,
                "concurrent_load": "none", "load": {"loadavg_1m": 0.5}, "tf32_matmul": None, "tf32_cudnn": None,
                "cudnn_benchmark": None}
    result = {"config": "x", "images_per_s": 1.0, "latency_median_ms": 1.0, "latency_p90_ms": 1.0,
              "slide_latency_median_ms": 1.0, "gflops": 1.0, "params_m": 1.0, "peak_memory_mb": 1.0,
              "peak_memory_kind": "rss", "protocol": protocol, "device_facts": {"cpu_model": "c"}}
    text = format_result(result)
    assert "TF32" not in text and "cudnn" not in text and "threads 2" in text
    text = format_result({**result, "protocol": {**protocol, "tf32_matmul": False, "tf32_cudnn": True,
                                                 "cudnn_benchmark": False}})
    assert "TF32 matmul False, TF32 cudnn True, cudnn.benchmark False" in text
