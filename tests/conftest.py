import os
import shutil
import tempfile
import types
from pathlib import Path

import pytest
import torch

# The Triton source runs under its interpreter where there is no GPU; this must be set before
# any kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Dataset fingerprints and data-check passes are cached per user; tests keep theirs apart (the
# variable reaches subprocesses and Ray workers too).
os.environ.setdefault("SEGREPRO_CACHE", tempfile.mkdtemp(prefix="segrepro-test-cache-"))

FIXTURES = Path(__file__).parent / "fixtures"
PARITY_DIRS = ["vit_mask", "vit_linear", "deit_distilled_mask"]


@pytest.fixture(params=PARITY_DIRS)
def parity_dir(request) -> Path:
    return FIXTURES / request.param


@pytest.fixture(scope="session")
def tiny_experiments():
    """``tiny_experiments(dest, {name: profile YAML})``: a copy of experiments/ at ``dest`` with
    ``tiny_test`` (seg_tiny_mask at two layers of width 64) and the given profiles, for
    SEGREPRO_EXPERIMENTS."""
    from harness.config import experiments_dir

    def make(dest: Path, profiles: dict[str, str]) -> Path:
        shutil.copytree(experiments_dir(), dest)
        text = (dest / "zoo" / "seg_tiny_mask.yaml").read_text()
        text = text.replace("d_model: 192", "d_model: 64").replace("n_layers: 12", "n_layers: 2").replace("n_heads: 3", "n_heads: 1")
        (dest / "zoo" / "tiny_test.yaml").write_text(text)
        for name, profile in profiles.items():
            (dest / "profiles" / f"{name}.yaml").write_text(profile)
        return dest
    return make


@pytest.fixture
def segrepro(capsys):
    """``segrepro(*args)``: the command line run in this process, as a subprocess would report it
    (``returncode``, ``stdout``, ``stderr``) without a new interpreter's start-up."""
    from harness.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        out = capsys.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


@pytest.fixture(scope="session")
def official_val_layout():
    """``make(root, count=2000)``: ROOT/ADEChallengeData2016 with the official ADE20K validation
    names (a few bytes each: what is checked without the real data is names, count and the
    download record) and one training pair; returns the dataset directory."""
    from harness.data.fingerprint import ADE20K_VAL_IMAGES

    def make(root: Path, count: int = ADE20K_VAL_IMAGES) -> Path:
        base = Path(root) / "ADEChallengeData2016"
        for kind, ext in (("images", "jpg"), ("annotations", "png")):
            for split, names in (("validation", [f"ADE_val_{i:08d}" for i in range(1, count + 1)]),
                                 ("training", ["ADE_train_00000001"])):
                d = base / kind / split
                d.mkdir(parents=True)
                for name in names:
                    (d / f"{name}.{ext}").write_bytes(f"{kind}/{name}".encode())
        return base
    return make
