"""`segrepro predict`: a coloured mask and probabilities for one image; bad images refused."""
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from harness.data.ade20k import PALETTE
from harness.inference import make_views, slide_inference
from harness.models import load_checkpoint

FIXTURE = "tests/fixtures/vit_linear"


def test_predict_writes_palette_mask_and_probabilities(tmp_path, segrepro):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 90, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    res = segrepro("predict", "--checkpoint", FIXTURE, "--image", tmp_path / "in.png", "--out", tmp_path / "mask.png",
                   "--ms-flip", "--logits", tmp_path / "p.npy")
    assert res.returncode == 0, res.stderr
    probs = np.load(tmp_path / "p.npy")
    assert probs.shape == (150, 50, 90) and np.allclose(probs.sum(0), 1, atol=1e-5)
    model, cfg = load_checkpoint(FIXTURE)
    views, flipped = make_views(torch.from_numpy(image).permute(2, 0, 1), cfg.data.test_scale, cfg.mean, cfg.std,
                                cfg.eval.scales, True)
    want = slide_inference(model, views, flipped, (50, 90), cfg.eval.window, cfg.eval.stride).numpy()
    assert np.allclose(probs, want, atol=1e-6)
    mask = np.asarray(Image.open(tmp_path / "mask.png").convert("RGB"))
    palette = np.asarray(PALETTE, dtype=np.uint8)
    assert (mask == palette[probs.argmax(0)]).all()


def test_predict_refuses_missing_and_non_images(tmp_path, segrepro):
    (tmp_path / "notes.jpg").write_text("not an image")
    for path, message in ((tmp_path / "absent.jpg", "no such image file"), (tmp_path / "notes.jpg", "not a readable image")):
        res = segrepro("predict", "--checkpoint", FIXTURE, "--image", path, "--out", tmp_path / "mask.png")
        assert res.returncode == 2 and message in res.stderr and str(path) in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mask.png").exists()


def test_predict_with_triton_kernels_from_the_command_line(tmp_path):
    """The CLI path with no TRITON_INTERPRET in the environment: segrepro sets it before timm
    imports triton, and the interpreted kernels give the PyTorch path's probabilities."""
    import os

    image = np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probs = {}
    for attention in ("torch", "triton"):
        res = subprocess.run([sys.executable, "-m", "harness.cli", "predict", "--checkpoint", "tests/fixtures/vit_mask",
                              "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / f"{attention}.png"),
                              "--logits", str(tmp_path / f"{attention}.npy"), "--attention", attention],
                             capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        probs[attention] = np.load(tmp_path / f"{attention}.npy")
    assert np.abs(probs["torch"] - probs["triton"]).max() < 1e-5
