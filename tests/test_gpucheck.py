"""harness.gpucheck (`make gpu-check`): the no-GPU exit, running without Ray and MLflow, the
summary, and the step functions on CPU with a tiny model; on a GPU, the whole check."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import gpucheck
from harness.data.synth import synthesize
from harness.gpucheck import StepRecord

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
no_cuda_only = pytest.mark.skipif(HAS_CUDA, reason="tests the no-GPU path")

# Seg-T-Mask's structure at 64 pixels (as tests/train's TINY): an iteration in a fraction of a second.
TINY = {"model": {"n_layers": 2, "d_model": 64, "n_heads": 1, "image_size": 64},
        "data": {"crop_size": 64, "train_scale": [256, 64], "test_scale": 64, "num_workers": 0},
        "optim": {"batch_size": 4}, "eval": {"window": 64, "stride": 48}}

# 8 iterations instead of 20: checkpoint at 4, a record every 2 (kill before 8 on Ray).
SHORT = {"optim": {"batch_size": 4, "iterations": 8, "checkpoint_interval": 4, "log_interval": 2}}

# Makes `import ray` / `import mlflow` fail as on a bare GPU machine without them.
REFUSE_RAY_MLFLOW = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("ray", "mlflow"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Refuse())
"""


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@no_cuda_only
def test_without_ray_mlflow_or_gpu_help_works_and_the_check_exits_0_writing_nothing(tmp_path):
    code = REFUSE_RAY_MLFLOW + f"""
from harness.gpucheck import main
try:
    main(["--help"])
except SystemExit as e:
    print("help exit", e.code)
print("check exit", main(["--out", {str(tmp_path / "out")!r}]))
print("loaded", sorted({{m.partition(".")[0] for m in sys.modules}} & {{"ray", "mlflow"}}))
"""
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "usage: python -m harness.gpucheck" in out and "help exit 0" in out
    assert gpucheck.NO_GPU_MESSAGE in out.splitlines() and "check exit 0" in out
    assert "loaded []" in out
    assert not (tmp_path / "out").exists()


@no_cuda_only
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_exits_0_with_the_no_gpu_message(tmp_path):
    # Where the checkout has no .venv the target falls back to $(PYTHON): point that at this interpreter.
    result = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}",
                             f"GPU_CHECK_OUT={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [gpucheck.NO_GPU_MESSAGE]
    assert not (tmp_path / "out").exists()


def test_an_out_path_that_is_a_file_exits_2(tmp_path, capsys):
    path = tmp_path / "summary"
    path.write_text("")
    assert gpucheck.main(["--out", str(path)]) == 2
    assert f"gpu-check: error: --out {path}: exists and is not a directory" in capsys.readouterr().err


def test_a_failing_step_is_recorded_and_does_not_raise():
    def boom(rec):
        rec.figures["before"] = 1.0
        raise RuntimeError("out of luck")

    def two_checks(rec):
        rec.fail("first")
        rec.fail("second")

    rec = gpucheck.run_step("boom", boom)
    assert (rec.status, rec.reason, rec.figures) == ("failed", "RuntimeError: out of luck", {"before": 1.0})
    assert rec.seconds >= 0
    assert gpucheck.run_step("two", two_checks).reason == "first; second"
    assert gpucheck.run_step("fine", lambda rec: None).status == "passed"


def test_summary_json_and_markdown(tmp_path):
    records = [
        StepRecord("GPU-only tests", seconds=12.5, figures={"passed": 42, "skipped": 0}),
        StepRecord("train fp32", "failed", "a loss is not finite", 3.04,
                   figures={"losses": [2.5, float("nan")], "peak_memory_mb": None}),
        StepRecord("Ray Train + NCCL", "skipped", "Ray is not importable"),
        StepRecord("bench", seconds=1.0, rows=[{"config": "seg_tiny_mask", "images_per_s": 123.456},
                                               {"config": "seg_base_mask", "error": "OutOfMemoryError: |x|"}]),
    ]
    device = {"gpu_name": "Some GPU", "torch_version": "2.x", "triton_version": "3.x", "driver_version": "1"}
    json_path, md_path = gpucheck.write_summary(tmp_path, gpucheck.summarize(records, device, True, 0.0))
    summary = json.loads(json_path.read_text())
    assert summary["passed"] is False and summary["quick"] is True
    assert summary["counts"] == {"passed": 2, "failed": 1, "skipped": 1}
    assert summary["device"] == device
    train = summary["steps"][1]
    assert (train["name"], train["status"], train["reason"]) == ("train fp32", "failed", "a loss is not finite")
    assert train["figures"]["losses"] == [2.5, None]  # JSON has no NaN
    assert summary["steps"][3]["rows"][0] == {"config": "seg_tiny_mask", "images_per_s": 123.456}
    md = md_path.read_text()
    assert md.startswith("# gpu-check: FAILED\n\nSome GPU; torch 2.x, triton 3.x, driver 1;")
    assert "| train fp32 | failed | 3 | a loss is not finite |" in md
    assert "| Ray Train + NCCL | skipped | 0 | Ray is not importable |" in md
    assert "| losses | 2.5, - |" in md
    assert "| config | images_per_s | error |" in md and "| seg_tiny_mask | 123.5 | - |" in md
    assert "OutOfMemoryError: \\|x\\|" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "summary.md"]
    # a rewrite replaces both files
    gpucheck.write_summary(tmp_path, gpucheck.summarize(records[:1], device, False, 0.0))
    assert json.loads(json_path.read_text())["passed"] is True
    assert md_path.read_text().startswith("# gpu-check: passed")


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="1">'
                   '<testcase classname="a" name="ok"/><testcase classname="a" name="bad"><failure/></testcase>'
                   '<testcase classname="b" name="err"><error/></testcase></testsuite></testsuites>')
    counts, failed = gpucheck.junit_counts(xml)
    assert counts == {"tests": 5, "passed": 2, "failed": 1, "errors": 1, "skipped": 1}
    assert failed == ["a::bad", "b::err"]


@no_cuda_only
def test_gpu_tests_step_fails_when_no_gpu_test_passes(tmp_path):
    rec = gpucheck.gpu_tests_step(tmp_path, ("tests/test_kernels/test_kernel_device.py",))
    assert rec.status == "failed" and rec.reason.startswith("no GPU test passed (1 skipped)")
    assert (rec.figures["tests"], rec.figures["skipped"], rec.figures["exit_status"]) == (1, 1, 0)
    assert (tmp_path / "gpu_tests.xml").is_file() and (tmp_path / "gpu_tests.log").is_file()


def _trace(runs: dict[int, range], loss=lambda t: 3.0 - t / 10) -> list[dict]:
    return [{"rank": 0, "start": start, "iteration": t, "loss": loss(t), "pid": start}
            for start, span in runs.items() for t in span]


def test_check_trace_of_a_run_stopped_and_resumed():
    # Ray: rank 0 died before iteration 18 and its replay of 11..17 gave the same losses.
    losses, diff, problems = gpucheck.check_trace(_trace({0: range(1, 18), 10: range(11, 21)}), 1, 10, 20)
    assert problems == [] and diff == 0.0
    assert sorted(losses) == list(range(1, 21)) and losses[20] == pytest.approx(1.0)
    # In process: no replay.
    assert gpucheck.check_trace(_trace({0: range(1, 11), 10: range(11, 21)}), 1, 10, 20)[1:] == (None, [])


@pytest.mark.parametrize("runs, problem", [
    ({0: range(1, 21)}, "got runs starting at [0]"),  # never resumed
    ({0: range(1, 14), 0 + 4: range(5, 21)}, "got runs starting at [0, 4]"),  # resumed from the wrong checkpoint
    ({0: range(1, 11), 10: range(11, 19)}, "expected 1..10 (or a few more), then 11..20"),  # stopped early
])
def test_check_trace_names_what_is_wrong(runs, problem):
    assert any(problem in p for p in gpucheck.check_trace(_trace(runs), 1, 10, 20)[2])


def test_training_config_is_the_zoo_crop_for_twenty_iterations():
    cfg = gpucheck.training_config("bf16")
    assert (cfg.name, cfg.data.crop_size, cfg.optim.batch_size, cfg.optim.amp) == ("seg_tiny_mask", 512, 8, "bf16")
    assert (cfg.optim.iterations, cfg.optim.checkpoint_interval, cfg.optim.log_interval) == (20, 10, 5)


def test_data_step_generates_once_and_again_when_the_spec_changes(tmp_path):
    spec = {"train": 2, "val": 1, "size": (16, 24), "classes": 3, "seed": 0}
    rec = gpucheck.data_step(tmp_path, spec)
    assert rec.status == "passed" and rec.figures["size"] == [16, 24]
    images = tmp_path / "ADEChallengeData2016" / "images"
    first = next((images / "training").iterdir())
    stamp = first.stat().st_mtime_ns
    assert gpucheck.data_step(tmp_path, spec).status == "passed"
    assert first.stat().st_mtime_ns == stamp  # reused
    assert gpucheck.data_step(tmp_path, {**spec, "train": 3}).status == "passed"
    assert len(list((images / "training").iterdir())) == 3


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpucheck_data")
    synthesize(root, train=16, val=2, size=(64, 64), classes=4, seed=1)
    return root


def test_train_step_in_process_then_eval_step_on_cpu(tiny_data, tmp_path):
    cfg = gpucheck.training_config("fp32", {**TINY, **SHORT, "eval": {**TINY["eval"], "scales": [0.75, 1.25]}})
    result = {}
    rec = gpucheck.train_step(cfg, tiny_data, tmp_path / "train", "cpu", on_ray=False, result=result)
    assert rec.status == "passed", rec.reason
    assert rec.name == "train seg_tiny_mask fp32 (in-process)"
    f = rec.figures
    assert (f["resumed_from"], f["iterations"], f["workers"], f["crop"]) == (4, 8, 1, 64)
    assert len(f["losses"]) == 8 and all(math.isfinite(v) for v in f["losses"])
    assert f["replayed_max_loss_diff"] is None and f["peak_memory_mb"] is None  # no replay, no CUDA
    assert f["s_per_iteration"] > 0 and 0 <= f["val_mIoU"] <= 100
    assert result["checkpoint"] == tmp_path / "train" / "checkpoints" / "iter_0000008" / "checkpoint.pth"

    rec = gpucheck.eval_step(result["checkpoint"], cfg, tiny_data, tmp_path / "eval", 2)
    assert rec.status == "passed", rec.reason
    for mode in ("ss", "msflip"):
        assert 0 <= rec.figures[f"{mode}_mIoU"] <= 100 and rec.figures[f"{mode}_images_per_s"] > 0
        assert (tmp_path / "eval" / f"{mode}_metrics.json").is_file()


@pytest.mark.slow
def test_train_step_on_ray_with_gloo_is_killed_once_and_resumed(tiny_data, tmp_path):
    # The GPU check's Ray Train path on CPU workers: rank 0 dies before iteration 8, Ray Train
    # restores it from the checkpoint at 4, and the replayed iterations give the same losses.
    pytest.importorskip("ray")
    cfg = gpucheck.training_config("fp32", {**TINY, **SHORT})
    result = {}
    rec = gpucheck.train_step(cfg, tiny_data, tmp_path, "cpu", on_ray=True, result=result)
    assert rec.status == "passed", rec.reason
    assert rec.name == "train seg_tiny_mask fp32 (Ray Train, gloo)"
    f = rec.figures
    assert (f["resumed_from"], f["iterations"], f["workers"], len(f["losses"])) == (4, 8, 1, 8)
    assert f["replayed_max_loss_diff"] == pytest.approx(0, abs=1e-6)
    assert (tmp_path / "killed").is_file() and result["checkpoint"].is_file()


@pytest.mark.parametrize("optim, message", [
    ({"checkpoint_interval": 5}, "checkpoint_interval must be 10"),
    ({"log_interval": 3}, "a multiple of optim.log_interval"),
])
def test_train_step_refuses_a_schedule_it_cannot_resume_half_way(optim, message, tiny_data, tmp_path):
    cfg = gpucheck.training_config("fp32", {**TINY, "optim": {"batch_size": 4, **optim}})
    rec = gpucheck.train_step(cfg, tiny_data, tmp_path, "cpu", on_ray=False)
    assert rec.status == "failed" and message in rec.reason


def test_train_step_on_ray_needs_room_to_stop_after_the_checkpoint(tiny_data, tmp_path):
    cfg = gpucheck.training_config("fp32", {**TINY, "optim": {"batch_size": 4, "iterations": 8,
                                                              "checkpoint_interval": 4, "log_interval": 4}})
    rec = gpucheck.train_step(cfg, tiny_data, tmp_path, "cpu", on_ray=True)
    assert rec.status == "failed" and "no room to stop the run at iteration 10" in rec.reason


def test_eval_step_without_a_checkpoint_is_skipped(tiny_data, tmp_path):
    rec = gpucheck.eval_step(None, gpucheck.training_config("fp32"), tiny_data, tmp_path, 2)
    assert rec.status == "skipped" and "no checkpoint" in rec.reason


def test_bench_step_on_cpu(tmp_path):
    cfg = gpucheck.training_config("fp32", TINY)
    rec = gpucheck.bench_step([cfg], ("fp32",), 1, 2, "cpu")
    assert rec.status == "passed", rec.reason
    (row,) = rec.rows
    assert row["config"] == "seg_tiny_mask" and row["precision"] == "fp32"
    assert row["images_per_s"] > 0 and row["gflops"] > 0 and row["params_m"] > 0


# ---------------------------------------------------------------- on a GPU

def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.gpu
@requires_cuda
def test_gpu_check_quick_passes_every_step(tmp_path):
    assert gpucheck.main(["--out", str(tmp_path), "--quick"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] and summary["device"]["device_type"] == "cuda"
    steps = {s["name"]: s for s in summary["steps"]}
    ray_missing = gpucheck.ray_missing()
    for name, s in steps.items():
        expected = "skipped" if ray_missing and name == "Ray Train + NCCL" else "passed"
        assert s["status"] == expected, (name, s["reason"])
        # every figure is a finite number (the summary writes NaN and infinity as null)
        assert all(math.isfinite(v) for v in _numbers([s["figures"], s["rows"]])), name
    runner = "in-process" if ray_missing else "Ray Train, NCCL"
    for precision in gpucheck.PRECISIONS:
        f = steps[f"train seg_tiny_mask {precision} ({runner})"]["figures"]
        assert f["resumed_from"] == 10 and f["iterations"] == 20 and f["peak_memory_mb"] > 0
    assert steps["GPU-only tests"]["figures"]["passed"] > 0
    assert len(steps["bench fp32, batch 1"]["rows"]) == len(gpucheck.SEED_CONFIGS)
    assert (tmp_path / "summary.md").read_text().startswith("# gpu-check: passed")
    assert (tmp_path / "kernels" / "kernels_profile.csv").is_file()


@pytest.mark.gpu
@requires_cuda
def test_gpu_train_step_in_process_bf16(tmp_path):
    # The path a machine without Ray takes; the quick check above uses Ray where it is importable.
    data = tmp_path / "data"
    assert gpucheck.data_step(data).status == "passed"
    rec = gpucheck.train_step(gpucheck.training_config("bf16"), data, tmp_path / "train", "cuda", on_ray=False)
    assert rec.status == "passed", rec.reason
    assert rec.figures["peak_memory_mb"] > 0 and rec.figures["s_per_iteration"] > 0
    assert len(rec.figures["losses"]) == 20
