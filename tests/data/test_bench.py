import argparse
import json

from harness.data import bench
from harness.data.bench import bench_pipeline


def test_bench_pipeline_reports_rate_and_protocol(synth_root):
    for workers in (0, 1):
        r = bench_pipeline(synth_root, workers=workers, batch_size=2, n_batches=3, crop_size=32, warmup=1)
        assert r["images_per_s"] > 0 and r["timed_s"] > 0
        assert r["images_per_s_per_worker"] * max(workers, 1) == r["images_per_s"]
        assert r["ms_per_image_per_worker"] == 1000 / r["images_per_s_per_worker"]
        assert (r["cpu_ms_per_image"] > 0) if workers == 0 else r["cpu_ms_per_image"] is None
        p = r["protocol"]
        assert p["workers"] == workers and p["batch_size"] == 2 and p["timed_batches"] == 3
        assert p["recipe"] == "reference" and p["crop_size"] == 32 and p["dataset_images"] == 12


def test_cli(synth_root, tmp_path, capsys):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--root", str(synth_root), "--batch-size", "2", "--batches", "2",
                         "--crop-size", "32", "--recipe", "paddlevit", "--json"])
    assert bench.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"]["recipe"] == "paddlevit" and out["images_per_s"] > 0
    assert bench.run(p.parse_args(["--root", str(tmp_path)])) == 2
    assert "missing directory" in capsys.readouterr().err
    assert bench.run(p.parse_args(["--root", str(synth_root), "--batches", "0"])) == 2


def _preflight_json(path, **measured):
    # the shape of `segrepro reproduce --preflight --json`: one measured configuration, one failed
    path.write_text(json.dumps({"ok": False, "configs": [
        {"config": "seg_tiny_mask", "measured": measured, "projection": {}},
        {"config": "seg_large_mask", "error": "not measured: the data check failed"}]}))
    return path


def test_step_need_from_preflight_and_step_time(synth_root, tmp_path, capsys):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    # a step of 1000 s cannot be starved; one of 1 us always is
    slow = _preflight_json(tmp_path / "slow.json", per_worker_batch=4, step_s=1000.0, loader_processes=2)
    args = ["--root", str(synth_root), "--batch-size", "2", "--batches", "2", "--crop-size", "32"]
    assert bench.run(p.parse_args(args + ["--preflight", str(slow), "--step-time", "1e-6"])) == 0
    out = capsys.readouterr().out.splitlines()
    assert "per worker" in out[0] and "ms/image" in out[0]
    assert "training step, seg_tiny_mask (preflight): needs 0.0 images/s (batch 4 / step 1000.000 s)" in out[1]
    assert "its 2 loader processes give" in out[1] and out[1].endswith("keeps up")
    assert "--step-time" in out[2] and "batch 2" in out[2] and "STARVED" in out[2]
    assert bench.run(p.parse_args(args + ["--step-time", "0.5", "--json"])) == 0
    need = json.loads(capsys.readouterr().out)["step_needs"]
    assert need == [{"source": "--step-time", "per_worker_batch": 2, "step_s": 0.5, "loader_processes": None,
                     "images_per_s": 4.0}]


def test_bad_step_need_is_refused_before_measuring(synth_root, tmp_path, capsys):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"configs": [{"config": "x", "error": "not measured"}]}))
    (tmp_path / "bad.json").write_text("{")
    for extra, message in ((["--preflight", str(tmp_path / "none.json")], "cannot read"),
                           (["--preflight", str(tmp_path / "bad.json")], "expected the JSON"),
                           (["--preflight", str(empty)], "no configuration was measured"),
                           (["--step-time", "0"], "--step-time must be positive")):
        assert bench.run(p.parse_args(["--root", str(synth_root)] + extra)) == 2
        err = capsys.readouterr().err
        assert message in err, err
