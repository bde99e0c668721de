import shutil

import pytest

from harness.data.synth import synthesize

# Small enough that every data test stays fast; 6 classes, borders and void regions.
SYNTH = dict(train=12, val=5, size=(64, 96), classes=6, seed=3)


@pytest.fixture(scope="session")
def synth_spec():
    """The arguments synth_root was generated with."""
    return dict(SYNTH)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """Parent directory of a generated ADEChallengeData2016 (read-only: do not modify)."""
    root = tmp_path_factory.mktemp("ade")
    synthesize(root, **SYNTH)
    return root


@pytest.fixture
def fresh_root(synth_root, tmp_path):
    """A private copy of the generated dataset that a test may damage."""
    shutil.copytree(synth_root / "ADEChallengeData2016", tmp_path / "ADEChallengeData2016")
    return tmp_path
