"""Sliding-window details beyond the parity fixtures: window grids and low-resolution views."""
import torch
import torch.nn as nn

from harness.inference import make_views, mmseg_origins, slide_inference, window_origins


class Recorder(nn.Module):
    """A model whose logits are a fixed function of the input: records every crop size."""

    n_cls = 3

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.extend([tuple(x.shape[-2:])] * x.shape[0])
        return torch.stack([x[:, 0], -x[:, 0], x[:, 1]], dim=1)


def test_window_origins():
    assert window_origins(80, 64, 48) == [0, 16]
    assert window_origins(64, 64, 48) == [0]
    assert window_origins(1000, 512, 480) == [0, 480, 488]
    assert mmseg_origins(1000, 512, 480) == [0, 480, 488]
    assert mmseg_origins(300, 512, 480) == [0]
    assert mmseg_origins(1500, 512, 480) == [0, 480, 960, 988]


def test_small_views_upsampled_or_low_res():
    view = torch.randn(1, 3, 40, 90)
    up, low = Recorder(), Recorder()
    p_up = slide_inference(up, [view], [False], (40, 90), window=64, stride=48, small_views="upsample")
    p_low = slide_inference(low, [view], [False], (40, 90), window=64, stride=48, small_views="low_res")
    assert set(up.sizes) == {(64, 64)}
    assert set(low.sizes) == {(40, 64)}
    for p in (p_up, p_low):
        assert p.shape == (3, 40, 90)
        assert torch.allclose(p.sum(0), torch.ones(40, 90), atol=1e-6)
    # the identity-like model at native resolution gives exactly the per-pixel softmax
    want = torch.softmax(torch.stack([view[0, 0], -view[0, 0], view[0, 1]]), 0)
    assert torch.allclose(p_low, want, atol=1e-6)


def test_flipped_view_is_mirrored_back():
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    views, flipped = make_views(image, 64, (127.5,) * 3, (127.5,) * 3, scales=(1.0,), flip=True)
    assert flipped == [False, True] and torch.equal(views[1], torch.flip(views[0], dims=(3,)))
    m = Recorder()
    both = slide_inference(m, views, flipped, (64, 96), window=64, stride=48)
    one = slide_inference(m, views[:1], [False], (64, 96), window=64, stride=48)
    assert torch.allclose(both, one, atol=1e-6)
