import argparse
import json

import numpy as np
import pytest
from PIL import Image

from harness.data import check
from harness.data.check import check_dataset

BASE = "ADEChallengeData2016"


def _args(root, **kw):
    p = argparse.ArgumentParser()
    check.add_arguments(p)
    return p.parse_args(["--root", str(root)] + [a for k, v in kw.items() for a in ((f"--{k}",) if v is True else ())])


def test_generated_dataset_passes(synth_root, capsys):
    assert check_dataset(synth_root, progress=False) == []
    assert check_dataset(synth_root / BASE, progress=False) == []
    assert check.run(_args(synth_root, json=True)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["problems"] == []
    n = {split: len(list((synth_root / BASE / "images" / split).iterdir())) for split in ("training", "validation")}
    assert out["counts"] == {split: {"images": k, "annotations": k} for split, k in n.items()}
    assert check.run(_args(synth_root)) == 0
    assert (f"ok (training {n['training']} images, {n['training']} annotations; validation {n['validation']} "
            f"images, {n['validation']} annotations)") in capsys.readouterr().out


def _missing_label(base):
    p = base / "annotations/training/ADE_train_00000003.png"
    p.unlink()
    return base / "images/training/ADE_train_00000003.jpg"


def _extra_label(base):
    p = base / "annotations/validation/ADE_val_00000099.png"
    Image.fromarray(np.ones((64, 96), np.uint8)).save(p)
    return p


def _undecodable_image(base):
    p = base / "images/training/ADE_train_00000005.jpg"
    p.write_bytes(p.read_bytes()[:200])  # truncated JPEG
    return p


def _label_value_200(base):
    p = base / "annotations/training/ADE_train_00000007.png"
    a = np.array(Image.open(p))
    a[10, 10] = 200
    Image.fromarray(a).save(p)
    return p


def _size_mismatch(base):
    p = base / "annotations/validation/ADE_val_00000002.png"
    Image.open(p).resize((95, 64), Image.NEAREST).save(p)
    return p


def _rgb_label(base):
    p = base / "annotations/training/ADE_train_00000001.png"
    Image.open(p).convert("RGB").save(p)
    return p


def _stray_file(base):
    p = base / "images/training/notes.txt"
    p.write_text("x")
    return p


def _missing_split(base):
    p = base / "annotations/validation"
    for f in p.iterdir():
        f.unlink()
    p.rmdir()
    return p


FAULTS = [_missing_label, _extra_label, _undecodable_image, _label_value_200, _size_mismatch,
          _rgb_label, _stray_file, _missing_split]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__.strip("_") for f in FAULTS])
def test_each_fault_is_found_and_named(fresh_root, fault, capsys):
    path = fault(fresh_root / BASE)
    problems = check_dataset(fresh_root, progress=False)
    assert problems, f"{fault.__name__} not detected"
    assert any(p.path == str(path) for p in problems), problems
    assert check.run(_args(fresh_root)) == 1
    assert str(path) in capsys.readouterr().err


def test_label_value_message_names_value(fresh_root):
    _label_value_200(fresh_root / BASE)
    (problem,) = check_dataset(fresh_root, progress=False)
    assert "200" in problem.message and "0..150" in problem.message


def test_split_sizes_checked_only_for_full_datasets(synth_root):
    # Generated: small, not flagged by default; --strict demands the official counts.
    strict = check_dataset(synth_root, expect_full=True, progress=False)
    assert {p.path.rsplit("/", 1)[-1] for p in strict} == {"training", "validation"}
    assert any("20210" in p.message for p in strict)


def test_missing_root_is_bad_input(tmp_path, capsys):
    assert check.run(_args(tmp_path / "nowhere")) == 2
    assert "nowhere" in capsys.readouterr().err
    assert check_dataset(tmp_path / "nowhere", progress=False)[0].message.startswith("no dataset")


def test_auto_size_rule_applies_above_threshold(synth_root, monkeypatch):
    assert check_dataset(synth_root, progress=False) == []
    monkeypatch.setattr(check, "FULL_SIZE_THRESHOLD", 10)  # the 12 training images now count as "full"
    assert any("20210" in p.message for p in check_dataset(synth_root, progress=False))
    assert check_dataset(synth_root, expect_full=False, progress=False) == []
