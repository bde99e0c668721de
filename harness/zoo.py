"""The zoo listing: every configuration with its parameter count and each source's documented
figures (``segrepro zoo``).

The parameter count is worked out from the config's shapes, not by building the model, so the
listing needs neither torch nor timm and answers in well under a second;
tests/test_zoo.py holds it equal to the built model's count for every configuration."""
from __future__ import annotations

from harness.config import ModelConfig, load_config, load_documented, zoo_names


def _block_parameters(dim: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block as timm's ``Block`` (qkv bias, no layer scale, no qk-norm)."""
    hidden = int(dim * mlp_ratio)
    norms = 2 * (2 * dim)
    attention = (dim * 3 * dim + 3 * dim) + (dim * dim + dim)
    mlp = (dim * hidden + hidden) + (hidden * dim + dim)
    return norms + attention + mlp


def parameter_count(m: ModelConfig) -> int:
    """Parameters of ``build_model(m)``, the 1000-way ImageNet head(s) the encoder keeps included."""
    d, extra = m.d_model, 2 if m.distilled else 1
    grid = (m.image_size // m.patch_size) ** 2
    heads = (2 if m.distilled else 1) * (d * 1000 + 1000)
    encoder = (3 * m.patch_size ** 2 * d + d) + extra * d + (grid + extra) * d \
        + m.n_layers * _block_parameters(d, m.mlp_ratio) + 2 * d + heads
    if m.decoder.name == "linear":
        decoder = d * m.n_cls + m.n_cls
    else:  # the reference's mask transformer: its width is the encoder's
        decoder = m.decoder.n_layers * _block_parameters(d, m.mlp_ratio) + m.n_cls * d + (d * d + d) \
            + 2 * d * d + 2 * d + 2 * m.n_cls
    return encoder + decoder


def zoo_table() -> list[dict]:
    """Every zoo configuration with its parameter count and the documented figures of each
    source; documented rows without a zoo configuration come last."""
    documented = load_documented()

    def figures(name: str) -> dict:
        return {f"{d['source']}.{d['metric']}": d["value"] for d in documented if d["config"] == name}

    rows = []
    for name in zoo_names():
        cfg = load_config(name)
        rows.append({"config": name, "description": cfg.description, "params_m": parameter_count(cfg.model) / 1e6,
                     "window": cfg.eval.window, "stride": cfg.eval.stride, "documented": figures(name)})
    for name in sorted({d["config"] for d in documented} - set(zoo_names())):
        rows.append({"config": name, "description": "documented only (no zoo configuration)",
                     "params_m": None, "window": None, "stride": None, "documented": figures(name)})
    return rows
