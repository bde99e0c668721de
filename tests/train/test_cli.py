"""``segrepro train`` arguments and the input errors caught before any worker starts."""
import argparse

import pytest

from harness.config import InputError
from harness.train.command import add_arguments, run


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_arguments_parse():
    a = _args("seg_tiny_mask", "--data-root", "d", "--profile", "smoke", "--workers", "2", "--resume",
              "--gpus-per-worker", "0.5", "--tracking-uri", "sqlite:///m.db")
    assert (a.config, a.workers, a.resume, a.gpus_per_worker, a.tracking_uri) == (
        "seg_tiny_mask", 2, True, 0.5, "sqlite:///m.db")
    assert not _args("seg_tiny_mask", "--data-root", "d").resume


@pytest.mark.parametrize("extra, message", [
    (["--workers", "3"], "not divisible by 3 workers"),
    (["--backbone-weights", "missing.pth"], "no such file"),
    (["--amp", "bf16"], "--amp bf16 needs CUDA workers"),
    (["--backbone-dir", "nowhere"], "--backbone-dir nowhere: no such directory"),
])
def test_bad_input_is_an_input_error(extra, message, data_root, tmp_path):
    with pytest.raises(InputError, match=message):
        run(_args("seg_tiny_mask", "--profile", "smoke", "--data-root", str(data_root),
                  "--run-dir", str(tmp_path), *extra))


def test_missing_dataset_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="data-root"):
        run(_args("seg_tiny_mask", "--profile", "smoke", "--data-root", str(tmp_path / "none"),
                  "--run-dir", str(tmp_path / "run")))
