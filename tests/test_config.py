"""The config schema: every zoo row resolves with every recipe; bad input names file and field."""
import shutil
from pathlib import Path

import pytest

from harness.identity import training_id
from harness.config import (ConfigError, experiments_dir, load_config, load_documented, recipe_names,
                            zoo_names)

SEED_ROWS = ["seg_tiny_mask", "seg_small_mask", "seg_base_mask", "seg_base_deit_linear", "seg_base_deit_mask"]


def test_zoo_rows_and_recipes_resolve():
    assert set(SEED_ROWS + ["seg_large_mask_640", "seg_base_patch8"]) == set(zoo_names())
    assert {"reference", "mmseg", "paddlevit"} <= set(recipe_names())
    hashes = set()
    for name in zoo_names():
        for recipe in recipe_names():
            for profile in ("full", "smoke"):
                cfg = load_config(name, recipe=recipe, profile=profile)
                assert (cfg.name, cfg.recipe, cfg.profile) == (name, recipe, profile)
                hashes.add(training_id(cfg, "one split"))
    assert len(hashes) == len(zoo_names()) * len(recipe_names()) * 2


def test_recipe_differences_follow_the_reference_table():
    ref, mms, pvt = (load_config("seg_base_mask", recipe=r) for r in ("reference", "mmseg", "paddlevit"))
    assert (ref.model.ln_eps, ref.optim.nesterov, ref.optim.min_lr, ref.optim.iterations) == (1e-5, True, 1e-5, 161728)
    assert (ref.model.decoder.dropout, ref.model.decoder.drop_path_rate, ref.model.drop_path_rate) == (0.1, 0.0, 0.1)
    assert (ref.eval.window, ref.eval.stride, ref.eval.small_views) == (512, 480, "upsample")
    assert (mms.model.ln_eps, mms.optim.nesterov, mms.optim.min_lr, mms.optim.iterations) == (1e-6, False, 1e-4, 160000)
    assert (mms.model.decoder.dropout, mms.model.decoder.drop_path_rate) == (0.0, 0.1)
    assert (mms.optim.loss_average, mms.eval.small_views) == ("all", "low_res")
    assert (pvt.optim.batch_size, pvt.optim.decoder_lr_mult, pvt.optim.clip_grad) == (16, 10.0, 1.0)
    assert (pvt.model.drop_path_rate, pvt.eval.stride, pvt.data.augmentation) == (0.0, 512, "paddlevit")
    deit = load_config("seg_base_deit_mask")
    assert deit.model.distilled and deit.model.normalization == "deit"
    large = load_config("seg_large_mask_640")
    assert (large.data.crop_size, large.eval.window, large.eval.stride) == (640, 640, 608)


def test_documented_figures_cover_every_source():
    rows = load_documented()
    seen = {(r["source"], r["metric"]) for r in rows}
    for pair in [("paddlevit", "miou_ss"), ("reference", "miou_ss"), ("reference", "miou_msflip"),
                 ("mmseg", "miou_ss"), ("mmseg", "miou_msflip"), ("reference", "params"), ("reference", "fps"),
                 ("mmseg", "fps"), ("mmseg", "train_memory")]:
        assert pair in seen
    pvt = {r["config"] for r in rows if r["source"] == "paddlevit"}
    assert pvt == set(SEED_ROWS)


@pytest.fixture
def experiments_copy(tmp_path, monkeypatch):
    dst = tmp_path / "experiments"
    shutil.copytree(experiments_dir(), dst)
    monkeypatch.setenv("SEGREPRO_EXPERIMENTS", str(dst))
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


BAD_CASES = {
    "malformed": ("d_model: 192", "d_model: [192", "malformed YAML", None),
    "unknown_field": ("  d_model: 192", "  d_model: 192\n  d_modle: 3", "unknown field", "model.d_modle"),
    "wrong_type": ("d_model: 192", "d_model: big", "expected an integer, got 'big'", "model.d_model"),
    "bad_choice": ("name: mask_transformer", "name: fancy", "expected one of 'mask_transformer', 'linear'",
                   "model.decoder.name"),
    "missing": ("  n_layers: 12\n", "", "missing", "model.n_layers"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_zoo_yaml_names_file_and_field(experiments_copy, case):
    old, new, message, field = BAD_CASES[case]
    path = experiments_copy / "zoo" / "seg_tiny_mask.yaml"
    _edit(path, old, new)
    with pytest.raises(ConfigError) as err:
        load_config("seg_tiny_mask")
    assert str(path) in str(err.value) and message in str(err.value)
    if field:
        assert f"field '{field}'" in str(err.value)


def test_unknown_recipe_and_profile():
    with pytest.raises(ConfigError, match="unknown recipe 'paddle'; expected one of mmseg, paddlevit, reference"):
        load_config("seg_tiny_mask", recipe="paddle")
    with pytest.raises(ConfigError, match="unknown profile 'quick'"):
        load_config("seg_tiny_mask", profile="quick")
    with pytest.raises(ConfigError, match="unknown configuration 'seg_huge'"):
        load_config("seg_huge")


def test_bad_recipe_file_names_it(experiments_copy):
    path = experiments_copy / "recipes" / "mmseg.yaml"
    _edit(path, "ln_eps: 1.0e-6", "ln_epsilon: 1.0e-6")
    with pytest.raises(ConfigError) as err:
        load_config("seg_tiny_mask", recipe="mmseg")
    assert str(path) in str(err.value) and "field 'model.ln_epsilon'" in str(err.value)


def test_cli_reports_bad_yaml_with_exit_2(experiments_copy, segrepro, monkeypatch):
    monkeypatch.setenv("SEGREPRO_EXPERIMENTS", str(experiments_copy))
    path = experiments_copy / "zoo" / "seg_small_mask.yaml"
    _edit(path, "n_heads: 6", "n_heads: six")
    res = segrepro("zoo")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "field 'model.n_heads'" in lines[0]


def test_zoo_lists_documented_figures_from_the_data_file(experiments_copy, segrepro, monkeypatch):
    import json

    monkeypatch.setenv("SEGREPRO_EXPERIMENTS", str(experiments_copy))
    res = segrepro("zoo", "--json")
    assert res.returncode == 0, res.stderr
    rows = {r["config"]: r for r in json.loads(res.stdout)}
    for fig in load_documented(experiments_copy / "documented.yaml"):
        assert rows[fig["config"]]["documented"][f"{fig['source']}.{fig['metric']}"] == fig["value"]
    for name in SEED_ROWS:
        assert "paddlevit.miou_ss" in rows[name]["documented"]
        assert rows[name]["params_m"] > 1
    # the figures come from the file: change one and the listing follows
    _edit(experiments_copy / "documented.yaml", "source: paddlevit, metric: miou_ss, value: ",
          "source: paddlevit, metric: miou_ss, value: 1")
    rows2 = {r["config"]: r for r in json.loads(segrepro("zoo", "--json").stdout)}
    changed = [n for n in SEED_ROWS if rows2[n]["documented"]["paddlevit.miou_ss"] != rows[n]["documented"]["paddlevit.miou_ss"]]
    assert len(changed) == 1
    table = segrepro("zoo")
    assert table.returncode == 0 and "seg_base_deit_mask" in table.stdout
