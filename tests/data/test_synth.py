import argparse
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import synth
from harness.data.ade20k import ADE20K, CLASSES
from harness.data.check import check_dataset
from harness.data.synth import class_appearance, synthesize

BASE = "ADEChallengeData2016"


def files(root):
    base = root / BASE
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def test_layout(synth_root, synth_spec):
    base = synth_root / BASE
    h, w = synth_spec["size"]
    for split, prefix, n in (("training", "ADE_train_", synth_spec["train"]),
                             ("validation", "ADE_val_", synth_spec["val"])):
        imgs = sorted((base / "images" / split).iterdir())
        labs = sorted((base / "annotations" / split).iterdir())
        assert [p.name for p in imgs] == [f"{prefix}{i:08d}.jpg" for i in range(1, n + 1)]
        assert [p.name for p in labs] == [f"{prefix}{i:08d}.png" for i in range(1, n + 1)]
        for ip, lp in zip(imgs, labs):
            im, lab = Image.open(ip), Image.open(lp)
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (w, h)
            assert lab.format == "PNG" and lab.mode == "L" and lab.size == (w, h)
            assert np.asarray(lab).max() <= synth_spec["classes"]
    assert check_dataset(synth_root, progress=False) == []
    meta = json.loads((base / synth.METADATA_FILE).read_text())
    assert meta["classes"] == synth_spec["classes"] and meta["class_names"] == list(CLASSES[:6])
    assert sorted(p.name for p in synth_root.iterdir()) == [BASE]  # no temp dir left behind


def test_labels_use_every_class_and_unlabelled(synth_root, synth_spec):
    values = set()
    for p in (synth_root / BASE / "annotations" / "training").iterdir():
        values |= set(np.unique(np.asarray(Image.open(p))).tolist())
    assert values == set(range(synth_spec["classes"] + 1))


def test_deterministic_byte_identical(tmp_path, synth_root, synth_spec):
    synthesize(tmp_path / "a", **synth_spec)
    assert files(tmp_path / "a") == files(synth_root)
    synthesize(tmp_path / "b", **{**synth_spec, "seed": synth_spec["seed"] + 1})
    b = files(tmp_path / "b")
    assert b.keys() == files(synth_root).keys()
    assert b["images/training/ADE_train_00000001.jpg"] != files(synth_root)["images/training/ADE_train_00000001.jpg"]
    # Validation images do not depend on the number of training images.
    synthesize(tmp_path / "c", **{**synth_spec, "train": 2})
    c = files(tmp_path / "c")
    assert c["images/validation/ADE_val_00000005.jpg"] == files(synth_root)["images/validation/ADE_val_00000005.jpg"]


def test_classes_separable_by_local_colour_after_jpeg(synth_root, synth_spec):
    """Nearest class-mean of the 5x5 mean colour, fitted on train, reaches mIoU > 0.9 on val."""
    k = synth_spec["classes"]

    def feats(img):
        x = torch.from_numpy(img).permute(2, 0, 1).float()[None]
        return torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)[0].permute(1, 2, 0).reshape(-1, 3).numpy()

    sums, counts = np.zeros((k, 3)), np.zeros(k)
    for item in ADE20K(synth_root, "training"):
        f, lab = feats(item["image"]), item["label"].reshape(-1)
        m = lab < 255
        np.add.at(sums, lab[m], f[m])
        np.add.at(counts, lab[m], 1)
    means = sums / counts[:, None]
    conf = np.zeros((k, k))
    for item in ADE20K(synth_root, "validation"):
        f, lab = feats(item["image"]), item["label"].reshape(-1)
        m = lab < 255
        pred = ((f[m][:, None] - means[None]) ** 2).sum(-1).argmin(1)
        np.add.at(conf, (lab[m], pred), 1)
    iou = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
    assert np.nanmean(iou) > 0.9, iou


def test_classes_have_distinct_textures():
    colors, freqs, angles = class_appearance(24)
    assert len({(f, a) for f, a in zip(freqs[1:], angles[1:])}) == 24
    assert len({tuple(np.round(c)) for c in colors[1:]}) == 24


def test_fast_enough(tmp_path):
    t0 = time.perf_counter()
    synthesize(tmp_path, train=200, val=1, size=(128, 128), classes=8, seed=0)
    assert time.perf_counter() - t0 < 15  # about 2 s on 2 CPU cores


def test_bad_arguments_and_existing_target(tmp_path, synth_root, capsys):
    for kw in ({"classes": 0}, {"classes": 151}, {"size": (4, 100)}, {"train": 0}):
        with pytest.raises(ValueError):
            synthesize(tmp_path / "x", **{"train": 1, "val": 1, "size": (16, 16), **kw})
    assert not (tmp_path / "x" / BASE).exists()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        synthesize(synth_root, train=1, val=1)
    out = synthesize(tmp_path / "y", train=1, val=1, size=(16, 16))
    synthesize(tmp_path / "y", train=2, val=1, size=(16, 16), overwrite=True)
    assert len(list((out / "images" / "training").iterdir())) == 2
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == [BASE]

    p = argparse.ArgumentParser()
    synth.add_arguments(p)
    assert synth.run(p.parse_args(["--root", str(tmp_path / "z"), "--size", "12x"])) == 2
    assert "--size '12x'" in capsys.readouterr().err
    assert synth.run(p.parse_args(["--root", str(tmp_path / "z"), "--classes", "200"])) == 2
    assert "classes" in capsys.readouterr().err
    assert synth.run(p.parse_args(["--root", str(tmp_path / "z"), "--train", "3", "--val", "2",
                                   "--size", "24x32"])) == 0
    assert len(ADE20K(tmp_path / "z", "training")) == 3
