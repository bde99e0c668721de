"""kernels.mask_logits (fused Segmenter mask step) against the reference's exact computation.

On CPU under TRITON_INTERPRET=1: C = 150 is padded to a 256-wide block, N is ragged against
the 32-row block, D = 64 takes two 32-wide steps.
"""

import pytest
import torch
from kernel_helpers import every_dtype, gpu_tolerance_dtype, requires_cuda

import kernels
from kernels.reference import mask_logits_reference

NAMES = ("out", "d_patches", "d_classes", "d_weight", "d_bias")


def _inputs(B, N, C, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    patches = torch.randn(B, N, D, generator=gen).to(device=device, dtype=dtype)
    classes = torch.randn(B, C, D, generator=gen).to(device=device, dtype=dtype)
    # LayerNorm parameters stay fp32, as under autocast.
    weight = (1 + 0.1 * torch.randn(C, generator=gen)).to(device)
    bias = (0.1 * torch.randn(C, generator=gen)).to(device)
    return [t.requires_grad_() for t in (patches, classes, weight, bias)]


def _run_both(inputs, eps=1e-5):
    out = kernels.mask_logits(*inputs, eps=eps)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, inputs, grad)
    ref_in = [t.detach().float().requires_grad_() for t in inputs]
    ref = mask_logits_reference(*ref_in, eps=eps)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.float())
    return (out, *grads), (ref, *ref_grads)


CASES = [
    (torch.float32, (2, 65, 150, 64)),
    (torch.float32, (1, 197, 150, 64)),
    (torch.float32, (1, 40, 19, 48)),  # D not a multiple of the D block, few classes
    (torch.float16, (2, 65, 150, 64)),
    (torch.float16, (1, 300, 150, 64)),
    (torch.bfloat16, (1, 65, 150, 64)),
]


@pytest.mark.parametrize("dtype,shape", CASES, ids=lambda x: str(x).removeprefix("torch."))
def test_forward_and_gradients_match_reference(dtype, shape, device, check_close):
    inputs = _inputs(*shape, dtype, device)
    got, want = _run_both(inputs)
    B, N, C, _ = shape
    assert got[0].dtype == dtype and got[0].shape == (B, N, C)
    for name, g, w in zip(NAMES, got, want):
        # d_weight/d_bias sum B*N terms of O(1): scale the absolute tolerance with sqrt(B*N).
        scale = (B * N) ** 0.5 if name in ("d_weight", "d_bias") else 1.0
        check_close(name, g, w, dtype, scale=scale)


def test_eps_is_used(device, check_close):
    # Nearly constant rows (all classes almost equal) make the variance tiny, so eps matters.
    B, N, C, D = 1, 33, 150, 64
    patches, classes, weight, bias = _inputs(B, N, C, D, torch.float32, device)
    with torch.no_grad():
        classes.copy_(classes[:, :1] + 1e-3 * classes)
    got, want = _run_both([patches, classes, weight, bias], eps=1e-2)
    check_close("out", got[0], want[0], torch.float32)
    no_eps = mask_logits_reference(patches, classes, weight, bias, eps=1e-12)
    assert (got[0] - no_eps).abs().max() > 0.1


# The interpreter evaluates 0/0 in NumPy, which warns; the NaN is the behaviour under test.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_zero_vectors_give_nan_exactly_where_the_reference_does(device, check_close):
    # Documented choice: no epsilon, like the reference. A zero patch row makes that row NaN;
    # a zero class vector makes its whole image NaN (LayerNorm over C). Other images are
    # unaffected, and gradients are NaN exactly where the reference's are.
    B, N, C, D = 3, 40, 150, 64
    inputs = _inputs(B, N, C, D, torch.float32, device)
    with torch.no_grad():
        inputs[0][0, 5] = 0  # patch 5 of image 0
        inputs[1][1, 7] = 0  # class 7 of image 1
    got, want = _run_both(inputs)
    out = got[0]
    assert out[0, 5].isnan().all() and not out[0, :5].isnan().any()
    assert out[1].isnan().all()
    assert not out[2].isnan().any()
    for name, g, w in zip(NAMES, got, want):
        assert torch.equal(g.isnan().cpu(), w.isnan().cpu()), name
        finite = ~w.isnan()
        if finite.any():
            scale = (B * N) ** 0.5 if name in ("d_weight", "d_bias") else 1.0
            check_close(name, g[finite], w[finite], torch.float32, scale=scale)


def test_rejects_bad_inputs(device):
    p = torch.randn(1, 8, 32, device=device)
    c = torch.randn(1, 5, 32, device=device)
    w, b = torch.ones(5, device=device), torch.zeros(5, device=device)
    with pytest.raises(ValueError, match="classes"):
        kernels.mask_logits(p, torch.randn(1, 5, 16, device=device), w, b)
    with pytest.raises(ValueError, match="weight and bias"):
        kernels.mask_logits(p, c, torch.ones(4, device=device), b)
    with pytest.raises(ValueError, match="1..1024 classes"):
        c_big = torch.randn(1, 1025, 32, device=device)
        kernels.mask_logits(p, c_big, torch.ones(1025, device=device),
                            torch.zeros(1025, device=device))
    with pytest.raises(ValueError, match="dtype"):
        kernels.mask_logits(p, c.half(), w, b)


def _check_on_gpu(shape, dtype, check_close):
    got, want = _run_both(_inputs(*shape, dtype, "cuda"))
    B, N, C, _ = shape
    assert got[0].dtype == dtype and got[0].shape == (B, N, C)
    for name, g, w in zip(NAMES, got, want):
        scale = (B * N) ** 0.5 if name in ("d_weight", "d_bias") else 4.0
        check_close(name, g, w, gpu_tolerance_dtype(dtype), scale=scale)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 1024, 150, 768), (2, 1600, 150, 1024)])
def test_gpu_zoo_shapes(dtype, shape, check_close):
    # Seg-B-Mask/16 at 512 and Seg-L-Mask/16 at 640.
    _check_on_gpu(shape, dtype, check_close)


# The CASES above run on a GPU too (the device fixture), but `-m gpu` (what `make gpu-check`
# runs) selects marked tests only: these hold the compiled kernel to the reference in every
# dtype on shapes ragged against every block config it may pick (16/32/64 rows, 32/64-wide D
# steps, 32/64 class blocks, C padded to a power of two up to 1024), a single patch included.
GPU_RAGGED = [(1, 1, 150, 64), (2, 65, 150, 64), (1, 197, 19, 48), (3, 1025, 150, 192), (1, 100, 1000, 100)]


@pytest.mark.gpu
@requires_cuda
@every_dtype
@pytest.mark.parametrize("shape", GPU_RAGGED, ids=str)
def test_gpu_ragged_shapes(dtype, shape, check_close):
    _check_on_gpu(shape, dtype, check_close)
