import argparse
import json

from harness.data import bench
from harness.data.bench import bench_pipeline


def test_bench_pipeline_reports_rate_and_protocol(synth_root):
    for workers in (0, 1):
        r = bench_pipeline(synth_root, workers=workers, batch_size=2, n_batches=3, crop_size=32, warmup=1)
        assert r["images_per_s"] > 0 and r["timed_s"] > 0
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
