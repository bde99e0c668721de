"""The zoo listing's parameter counts, worked out from shapes, against the built models."""
import dataclasses

import pytest
import torch

from harness.config import load_config, zoo_names
from harness.models import build_model, count_parameters
from harness.zoo import parameter_count, zoo_table


def _built(model_cfg) -> int:
    with torch.device("meta"):  # shapes only
        return count_parameters(build_model(model_cfg))


@pytest.mark.parametrize("name", zoo_names())
def test_parameter_count_is_the_built_models(name):
    m = load_config(name).model
    assert parameter_count(m) == _built(m)


def test_parameter_count_follows_every_shape_setting():
    m = load_config("seg_tiny_mask").model
    variants = [dataclasses.replace(m, distilled=True), dataclasses.replace(m, mlp_ratio=3.0),
                dataclasses.replace(m, image_size=640, patch_size=8, n_cls=19),
                dataclasses.replace(m, decoder=dataclasses.replace(m.decoder, name="linear")),
                dataclasses.replace(m, decoder=dataclasses.replace(m.decoder, n_layers=3))]
    counts = [parameter_count(v) for v in variants]
    assert counts == [_built(v) for v in variants]
    assert len(set(counts)) == len(counts)


def test_zoo_lists_every_configuration_and_documented_row(segrepro):
    import json

    result = segrepro("zoo", "--json")
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    assert [r["config"] for r in rows][:len(zoo_names())] == zoo_names()
    assert rows == json.loads(json.dumps(zoo_table()))
