"""Parity with MMSegmentation 1.2.2 and PaddleViT on shared/fixtures/{mmseg,paddlevit} (copied to
tests/fixtures): each checkpoint read in its source's own format by ``load_checkpoint``, run with
the protocol the loaded config carries, gives what the source's own code gave."""
import pytest
import torch

from harness.inference import slide_inference
from harness.models import load_checkpoint

from tests.conftest import FIXTURES

SOURCE_DIRS = {"mmseg_mask": "mmseg", "mmseg_linear": "mmseg", "pvt_mask": "paddlevit", "pvt_linear": "paddlevit"}
# the fixtures' READMEs: float32 rounding of PaddleViT's mask logits (mask_norm divides by the small
# spread of cosine similarities) reaches 1.1e-5 against float64, hence 3e-5 there
LOGIT_ATOL = {"pvt_mask": 3e-5}


def _check(out: torch.Tensor, exp: dict, atol: float) -> None:
    assert tuple(out.shape) == tuple(exp["shape"])
    got = out.reshape(-1)[exp["index"]]
    assert torch.allclose(got, exp["values"], atol=atol, rtol=0), (got - exp["values"]).abs().max()
    assert torch.equal(out.argmax(0).to(torch.uint8), exp["argmax"])


@pytest.fixture(params=sorted(SOURCE_DIRS))
def source_dir(request):
    return FIXTURES / request.param


def test_forward_parity(source_dir):
    model, cfg = load_checkpoint(source_dir)
    assert cfg.source == SOURCE_DIRS[source_dir.name] == cfg.eval.protocol
    exp = torch.load(source_dir / "expected.pt", weights_only=True)
    x = exp["inputs"]
    with torch.no_grad():
        _check(model(x["x64"])[0], exp["forward_64"], LOGIT_ATOL.get(source_dir.name, 1e-5))
        if "forward_45x70" in exp:  # MMSeg: padding, bicubic position grid, logits straight to 45x70
            _check(model(x["x_pad"])[0], exp["forward_45x70"], 1e-5)
        else:  # PaddleViT adds its position embedding at the stored grid: any other input fails
            with pytest.raises(ValueError, match="stored 4x4 grid"):
                model(x["x_pad"])


def test_slide_parity_with_the_loaded_protocol(source_dir):
    model, cfg = load_checkpoint(source_dir)
    exp = torch.load(source_dir / "expected.pt", weights_only=True)
    x, e = exp["inputs"], cfg.eval
    assert (e.window, e.stride) == (64, 48)
    ss = slide_inference(model, [x["im_slide"]], [False], (80, 112), e.window, e.stride, small_views=e.small_views)
    _check(ss, exp["slide_ss"], 1e-6)
    if "slide_msflip" in exp:  # MMSeg: the 0.5 views (40x56) run at their own resolution
        assert e.small_views == "low_res"
        ms = slide_inference(model, list(x["msflip_views"]), list(x["msflip_flipped"]), (80, 112), e.window,
                             e.stride, small_views=e.small_views)
        _check(ms, exp["slide_msflip"], 1e-6)
