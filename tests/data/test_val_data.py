"""Which validation data a run read (harness.data.fingerprint.val_data): the official ADE20K
split is recognised by its names and count, verified by the record of the official archive,
and generated data never counts as real, whatever its names."""
from __future__ import annotations

import json

import pytest

from harness import contract
from harness.data.download import OFFICIAL_SHA1
from harness.data.fingerprint import (ADE20K_VAL_IMAGES, DOWNLOAD_RECORD, split_fingerprint, val_data,
                                      write_download_record)
from harness.data.synth import METADATA_FILE, synthesize

BASE = "ADEChallengeData2016"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGREPRO_CACHE", str(tmp_path / "cache"))


def test_the_official_split_is_verified_by_the_record_of_the_official_archive(tmp_path, official_val_layout):
    base = official_val_layout(tmp_path)
    kind, note = val_data(tmp_path)
    assert kind == contract.VAL_UNVERIFIED and DOWNLOAD_RECORD in note  # names and count alone: not verified
    write_download_record(base, OFFICIAL_SHA1, "http://example/ADEChallengeData2016.zip")
    assert val_data(tmp_path)[0] == contract.VAL_ADE20K
    # one label rewritten after extraction: no longer the archive's content
    (base / "annotations" / "validation" / "ADE_val_00000001.png").write_bytes(b"other")
    kind, note = val_data(tmp_path, split_fingerprint(tmp_path, "validation"))
    assert kind == contract.VAL_UNVERIFIED and "changed since" in note


def test_another_archive_or_missing_names_are_not_the_official_split(tmp_path, official_val_layout):
    base = official_val_layout(tmp_path / "a")
    write_download_record(base, "0" * 40, "http://example/other.zip")
    kind, note = val_data(base)
    assert kind == contract.VAL_UNVERIFIED and "0" * 40 in note
    (base / "images" / "validation" / "ADE_val_00002000.jpg").unlink()
    assert val_data(base)[0] == contract.VAL_OTHER
    assert val_data(official_val_layout(tmp_path / "b", count=50))[0] == contract.VAL_OTHER


def test_generated_data_is_never_real_whatever_its_names_and_record(tmp_path):
    root = tmp_path / "gen"
    synthesize(root, train=1, val=ADE20K_VAL_IMAGES, size=(8, 8), classes=2)  # the official names and count
    write_download_record(root / BASE, OFFICIAL_SHA1, "forged")
    kind, note = val_data(root)
    assert kind == contract.VAL_GENERATED and METADATA_FILE in note
    assert json.loads((root / BASE / METADATA_FILE).read_text())["val"] == ADE20K_VAL_IMAGES
