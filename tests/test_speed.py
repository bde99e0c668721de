"""``segrepro bench --suite inference``: every workload timed with its protocol beside it."""
import json

import pytest
import yaml

from harness.models import load_checkpoint


@pytest.fixture(scope="module")
def small_yaml(tmp_path_factory):
    """The parity fixture's model (window 64, stride 48, test scale 64) as a config file."""
    _, cfg = load_checkpoint("tests/fixtures/vit_mask")
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def test_inference_suite_times_every_workload_with_its_protocol(small_yaml, segrepro):
    res = segrepro("bench", "--suite", "inference", "--configs", small_yaml, "--image", "72x100",
                   "--threads", "1", "--warmup", "0", "--repeats", "2", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["threads"], out["precision"], out["repeats"], out["warmup"]) == (1, "fp32", 2, 0)
    assert out["freed_memory_kept"] is True
    rows = {r["work"]: r for r in out["rows"]}
    assert list(rows) == ["forward", "slide", "msflip"]
    assert all(len(r["runs_ms"]) == 2 and 0 < r["min_ms"] <= r["median_ms"] for r in rows.values())
    assert rows["forward"]["input"] == [1, 3, 64, 64]
    # 72x100 fits into (256, 64): view 64x89, two windows across; ms+flip: 6 scales, mirrored
    assert rows["slide"]["views"] == [[64, 89]] and rows["slide"]["windows"] == 2
    assert len(rows["msflip"]["views"]) == 12 and rows["msflip"]["windows"] > 12
    text = segrepro("bench", "--suite", "inference", "--configs", small_yaml, "--works", "forward",
                    "--image", "72x100", "--warmup", "0", "--repeats", "1")
    assert text.returncode == 0 and "2 threads" in text.stdout and "forward" in text.stdout


def test_inference_suite_refuses_unknown_work_and_image(small_yaml, segrepro):
    bad = segrepro("bench", "--suite", "inference", "--configs", small_yaml, "--works", "train")
    assert bad.returncode == 2 and "train" in bad.stderr
    bad = segrepro("bench", "--suite", "inference", "--configs", small_yaml, "--image", "72")
    assert bad.returncode == 2 and "72" in bad.stderr
    assert segrepro("bench").returncode == 2
