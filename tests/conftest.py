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
