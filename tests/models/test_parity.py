"""Parity with the reference implementation on shared/fixtures/segmenter-official (copied to
tests/fixtures): same weights -> same logits, same sliding-window and ms+flip probabilities."""
import torch

from harness.inference import slide_inference
from harness.models import load_checkpoint


def _expected(d):
    return torch.load(d / "expected.pt", weights_only=True)


def _check(out: torch.Tensor, exp: dict, atol: float) -> None:
    assert tuple(out.shape) == tuple(exp["shape"])
    got = out.reshape(-1)[exp["index"]]
    assert torch.allclose(got, exp["values"], atol=atol, rtol=0), (got - exp["values"]).abs().max()
    am = out.argmax(0).to(torch.uint8)
    differ = am != exp["argmax"]
    if differ.any():
        # allowed only where the top two classes are within 1e-5 (ties)
        top2 = out.topk(2, dim=0).values
        assert ((top2[0] - top2[1])[differ] < 1e-5).all()


def test_forward_parity(parity_dir):
    model, cfg = load_checkpoint(parity_dir)
    exp = _expected(parity_dir)
    x = exp["inputs"]
    with torch.no_grad():
        _check(model(x["x64"])[0], exp["forward_64"], 1e-5)
        _check(model(x["x_pad"])[0], exp["forward_45x70"], 1e-5)


def test_slide_parity(parity_dir):
    model, cfg = load_checkpoint(parity_dir)
    exp = _expected(parity_dir)
    x = exp["inputs"]
    assert (cfg.eval.window, cfg.eval.stride) == (64, 48)
    ss = slide_inference(model, [x["im_slide"]], [False], (80, 112), cfg.eval.window, cfg.eval.stride)
    _check(ss, exp["slide_ss"], 1e-6)
    ms = slide_inference(model, list(x["msflip_views"]), list(x["msflip_flipped"]), (80, 112),
                         cfg.eval.window, cfg.eval.stride)
    _check(ms, exp["slide_msflip"], 1e-6)


def test_forward_parity_with_triton_kernels(parity_dir, monkeypatch):
    """The same Segmenter with the Triton attention and mask step (interpreter on CPU)."""
    import kernels

    calls = []
    for name in ("attention", "mask_logits"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    model, cfg = load_checkpoint(parity_dir, attention="triton", mask_step="triton")
    assert cfg.model.attention == "triton" and cfg.model.mask_step == "triton"
    exp = _expected(parity_dir)
    with torch.no_grad():
        _check(model(exp["inputs"]["x_pad"])[0], exp["forward_45x70"], 1e-5)
    n_attn = cfg.model.n_layers + (cfg.model.decoder.n_layers if cfg.model.decoder.name == "mask_transformer" else 0)
    assert calls.count("attention") == n_attn
    assert calls.count("mask_logits") == (1 if cfg.model.decoder.name == "mask_transformer" else 0)
