import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from harness.data.ade20k import (ADE20K, CLASSES, IGNORE_INDEX, PALETTE, colorize, dataset_dir,
                                 reduce_label)
from harness.data.transforms import build_train_transform, seed_worker


def test_classes_and_palette():
    assert len(CLASSES) == 150 and len(set(CLASSES)) == 150
    assert CLASSES[:5] == ("wall", "building", "sky", "floor", "tree")
    assert CLASSES[-1] == "flag"
    assert len(PALETTE) == 150
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)
    assert PALETTE[0] == (120, 120, 120) and PALETTE[149] == (92, 0, 255)


def test_reduce_label():
    raw = np.arange(256, dtype=np.uint8)
    red = reduce_label(raw)
    assert red.dtype == np.uint8
    assert red[0] == IGNORE_INDEX
    assert (red[1:151] == np.arange(150)).all()
    assert (red[151:] == IGNORE_INDEX).all()
    with pytest.raises(TypeError):
        reduce_label(raw.astype(np.int32))


def test_colorize():
    lab = np.array([[0, 1], [255, 149]], dtype=np.uint8)
    out = np.asarray(colorize(lab))
    assert out.shape == (2, 2, 3)
    assert tuple(out[0, 0]) == PALETTE[0] and tuple(out[0, 1]) == PALETTE[1]
    assert tuple(out[1, 0]) == (0, 0, 0) and tuple(out[1, 1]) == PALETTE[149]
    assert np.asarray(colorize(torch.tensor([[2, -1]]))).tolist() == [[list(PALETTE[2]), [0, 0, 0]]]


def test_dataset_dir_accepts_parent_and_itself(synth_root, synth_spec):
    base = synth_root / "ADEChallengeData2016"
    assert dataset_dir(synth_root) == base
    assert dataset_dir(base) == base
    assert len(ADE20K(synth_root, "validation")) == len(ADE20K(base, "validation")) == synth_spec["val"]


def test_items_without_transform(synth_root, synth_spec):
    ds = ADE20K(synth_root, "training")
    assert len(ds) == synth_spec["train"]
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        img, lab = item["image"], item["label"]
        assert img.dtype == np.uint8 and img.shape == (*synth_spec["size"], 3)
        assert lab.dtype == np.uint8 and lab.shape == synth_spec["size"]
        raw = np.asarray(Image.open(ds.files(i)[1]))
        assert (lab == reduce_label(raw)).all()
        assert re.fullmatch(r"ADE_train_\d{8}", item["name"])
        seen |= set(np.unique(lab).tolist())
    # Generated labels 1..K are ADE20K classes 0..K-1; 0 (borders, voids) becomes ignore.
    assert seen <= set(range(synth_spec["classes"])) | {IGNORE_INDEX}
    assert IGNORE_INDEX in seen and len(seen) > 3


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 13, 20])
def test_shards_cover_every_index_once(synth_root, world_size):
    ds = ADE20K(synth_root, "training")
    shards = [ds.shard(r, world_size) for r in range(world_size)]
    indices = [s[i]["index"] for s in shards for i in range(len(s))]
    assert sorted(indices) == list(range(len(ds)))
    lengths = [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1
    # Strided and deterministic.
    assert [s.names for s in shards] == [ds.shard(r, world_size).names for r in range(world_size)]
    assert shards[0].names == ds.names[::world_size]


def test_shard_rejects_bad_rank(synth_root):
    ds = ADE20K(synth_root, "training")
    for rank, world in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError):
            ds.shard(rank, world)


def _train_ds(root, seed=0):
    t = build_train_transform("reference", 48, (127.5,) * 3, (127.5,) * 3, scale=(96, 64))
    return ADE20K(root, "training", transform=t, seed=seed)


def test_augmentation_is_a_function_of_seed_epoch_index(synth_root):
    ds = _train_ds(synth_root)
    a, b = ds[3], ds[3]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ds.set_epoch(1)
    c = ds[3]
    assert not torch.equal(a["image"], c["image"])
    assert torch.equal(c["image"], ds[(1, 3)]["image"])
    ds.set_epoch(0)
    assert torch.equal(a["image"], ds[(0, 3)]["image"])
    assert not torch.equal(a["image"], _train_ds(synth_root, seed=1)[3]["image"])
    # A shard item sees the same augmentation as the full-split item with that index.
    shard = ds.shard(1, 2)
    assert shard[1]["index"] == 3 and torch.equal(shard[1]["image"], a["image"])


def test_loader_identical_for_any_worker_count(synth_root):
    ds = _train_ds(synth_root)
    ds.set_epoch(2)

    def batches(workers):
        loader = DataLoader(ds, batch_size=4, num_workers=workers, worker_init_fn=seed_worker)
        return [(b["image"], b["label"]) for b in loader]

    ref = batches(0)
    for workers in (2,):
        got = batches(workers)
        assert len(got) == len(ref)
        for (i0, l0), (i1, l1) in zip(ref, got):
            assert torch.equal(i0, i1) and torch.equal(l0, l1)


def test_missing_label_is_named(fresh_root):
    lab = fresh_root / "ADEChallengeData2016/annotations/training/ADE_train_00000004.png"
    lab.unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000004.png"):
        ADE20K(fresh_root, "training")


def test_undecodable_image_is_named(fresh_root):
    img = fresh_root / "ADEChallengeData2016/images/validation/ADE_val_00000002.jpg"
    img.write_bytes(b"not a jpeg")
    ds = ADE20K(fresh_root, "validation")
    with pytest.raises(ValueError, match="ADE_val_00000002.jpg"):
        ds[1]
