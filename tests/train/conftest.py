import pytest

from harness.config import load_config
from harness.data.synth import synthesize

# 16 training images at global batch 4: 4 iterations per epoch on one worker, 2 per rank-epoch
# on two, so short runs cross epoch boundaries and resume mid-epoch.
SYNTH = dict(train=16, val=4, size=(64, 64), classes=4, seed=1)

# Seg-T-Mask's structure (mask transformer, dropout 0.1, drop-path 0.1) at a size that trains
# an iteration in a fraction of a second on one core.
TINY = {
    "model": {"n_layers": 2, "d_model": 64, "n_heads": 1, "image_size": 64},
    "data": {"crop_size": 64, "train_scale": [256, 64], "test_scale": 64, "num_workers": 0},
    "optim": {"batch_size": 4, "log_interval": 1, "eval_interval": 1000, "checkpoint_interval": 1000},
    "eval": {"window": 64, "stride": 48},
}


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade_train")
    synthesize(root, **SYNTH)
    return root


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for k, v in extra.items():
        out.setdefault(k, {}).update(v)
    return out


@pytest.fixture
def tiny_cfg():
    """``tiny_cfg(recipe=None, **sections)``: the smoke profile of seg_tiny_mask, shrunk."""
    def make(recipe=None, **sections):
        return load_config("seg_tiny_mask", recipe=recipe, profile="smoke", overrides=_merge(TINY, sections))
    return make
