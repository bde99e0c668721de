"""The MMSeg/reference training transform gives MMSegmentation 1.2.2's pixels exactly, on real
photographs: the expected outputs were written by MMSeg's own transforms (mmcv-lite 2.1.0,
same OpenCV), see fixtures/mmseg_pipeline/README.md."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data.transforms import MMSegTrainTransform, _normalize_hwc, photometric_distortion

FIXTURES = Path(__file__).parent / "fixtures" / "mmseg_pipeline"


def _load_sources():
    # generate.py holds the inputs' definition; it imports MMSeg only inside main().
    spec = importlib.util.spec_from_file_location("mmseg_pipeline_sources", FIXTURES / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SRC = _load_sources()
PHOTOS = ("hopper", "hopper_patch", "present")


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "expected.npz") as z:
        return dict(z)


@pytest.fixture(scope="module")
def photos():
    return {name: (rgb, SRC.label_of(rgb)) for name, rgb in SRC.photographs().items()}


class LegacyDraws:
    """MMSeg's draws (NumPy's legacy RNG seeded with np.random.seed) under the Generator method
    names the transforms call, so both sides use the same random numbers in the same order."""

    def __init__(self, seed):
        self._rs = np.random.RandomState(seed)

    def random(self):
        return self._rs.random_sample()

    def integers(self, low, high=None):
        return self._rs.randint(low, high)

    def uniform(self, low, high):
        return self._rs.uniform(low, high)


def assert_same_pixels(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {got.shape}, MMSeg {want.shape}"
    differ = got != want
    assert not differ.any(), (f"{what}: {differ.mean():.1%} of values differ from MMSeg's, by up to "
                              f"{np.abs(got.astype(int) - want).max()}")


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("kind", ["geometry", "full"])
def test_train_pipeline_is_mmseg_pixel_for_pixel(name, kind, photos, expected):
    # Resize (down- and upscaling), cat_max_ratio crop and flip; "full" adds the photometric
    # distortion.
    rgb, label = photos[name]
    t = MMSegTrainTransform(SRC.CROP, SRC.MEAN, SRC.STD, scale=SRC.SCALE, photometric=kind == "full")
    for seed in SRC.SEEDS:
        img, lab = t.augment(rgb, label, LegacyDraws(seed))
        assert_same_pixels(lab, expected[f"{name}/{kind}/{seed}/label"], f"{name} {kind} seed {seed} label")
        assert_same_pixels(img, expected[f"{name}/{kind}/{seed}/image"], f"{name} {kind} seed {seed} image")


@pytest.mark.parametrize("name", PHOTOS)
def test_photometric_distortion_is_mmseg_pixel_for_pixel(name, photos, expected):
    patch = np.ascontiguousarray(photos[name][0][:48, :64])
    changed = 0
    for seed in SRC.PHOTOMETRIC_SEEDS:
        out = photometric_distortion(patch, LegacyDraws(seed))
        assert_same_pixels(out, expected[f"{name}/photometric/{seed}"], f"{name} seed {seed}")
        changed += not np.array_equal(out, patch)
    assert changed >= len(SRC.PHOTOMETRIC_SEEDS) // 2


def test_normalisation_is_mmseg_data_preprocessor(photos, expected):
    rgb, label = photos["hopper_patch"]
    t = MMSegTrainTransform(SRC.CROP, SRC.MEAN, SRC.STD, scale=SRC.SCALE)
    img, _ = t(rgb, label, LegacyDraws(0))
    assert torch.equal(img, torch.from_numpy(expected["normalized"]))


@pytest.mark.parametrize("stats", ["vit", "imagenet"])
def test_normalisation_is_the_references_imnormalize_on_every_value(stats, expected):
    # The reference normalises in its MMSeg 0.x pipeline (mmcv.imnormalize, OpenCV arithmetic),
    # MMSeg 1.x in its data preprocessor (torch): both must come out the same, for every uint8.
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    got = _normalize_hwc(ramp, *SRC.NORMALIZATIONS[stats]).numpy().transpose(1, 2, 0)
    assert np.array_equal(got, expected[f"imnormalized/{stats}"])
