"""kernels.attention (Triton, FlashAttention-2) against the PyTorch reference.

On CPU these run the Triton source under TRITON_INTERPRET=1, so shapes stay small; every N is
ragged against the interpreter's blocks (64 queries x 32 keys forward).
"""

import pytest
import torch
from kernel_helpers import every_dtype, gpu_tolerance_dtype, requires_cuda

import kernels
from kernels.reference import attention_reference


def _inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            for _ in range(3)]


def _run_both(q, k, v, scale=None):
    """Kernel and fp32 reference outputs and (dq, dk, dv) for one random output gradient."""
    out = kernels.attention(q, k, v, scale)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_in, scale)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.float())
    return (out, *grads), (ref, *ref_grads)


CASES = [
    (torch.float32, (1, 2, 65, 32)),
    (torch.float32, (2, 1, 197, 64)),
    (torch.float32, (1, 1, 300, 128)),
    (torch.float32, (1, 1, 65, 48)),  # head dim below its 64-wide block: masked on D too
    (torch.float16, (1, 2, 65, 64)),
    (torch.float16, (1, 1, 197, 128)),
    (torch.float16, (1, 1, 300, 32)),
    (torch.bfloat16, (1, 1, 65, 64)),
]


@pytest.mark.parametrize("dtype,shape", CASES, ids=lambda x: str(x).removeprefix("torch."))
def test_forward_and_gradients_match_reference(dtype, shape, device, check_close):
    q, k, v = _inputs(shape, dtype, device)
    got, want = _run_both(q, k, v)
    assert got[0].dtype == dtype and got[0].shape == shape
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        check_close(name, g, w, dtype)


def test_explicit_scale(device, check_close):
    q, k, v = _inputs((1, 1, 65, 32), torch.float32, device)
    got, want = _run_both(q, k, v, scale=0.37)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        check_close(name, g, w, torch.float32)


# Under the interpreter, NumPy warns about the inf/NaN the dK/dV kernel computes for padded
# key rows; those rows are never stored.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("n", [33, 97])
def test_padded_keys_are_masked_to_minus_inf(n, device, check_close):
    # Every real score is -20 * sqrt(D) = -160. A padded key scored 0 instead of -inf would
    # outweigh all real keys and pull the output to its zero value; recomputed in the backward
    # without the mask, its weight exp(0 - lse) = exp(160) overflows fp32 and makes NaN.
    d = 64
    q = torch.full((1, 1, n, d), 20.0, device=device, requires_grad=True)
    k = (-torch.ones(1, 1, n, d, device=device)).requires_grad_()
    v = (1 + torch.rand(1, 1, n, d, generator=torch.Generator().manual_seed(0))).to(device)
    v.requires_grad_()
    got, want = _run_both(q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        check_close(name, g, w, torch.float32)


def test_output_does_not_depend_on_which_block_a_key_lands_in(device):
    # Permuting keys (with their values) moves them between full blocks and the partial last
    # block; softmax attention is invariant to that, so the padding must be too.
    q, k, v = _inputs((1, 2, 65, 64), torch.float32, device)
    perm = torch.randperm(65, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        a = kernels.attention(q, k, v)
        b = kernels.attention(q, k[:, :, perm], v[:, :, perm])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_never_reads_past_n(device, check_close):
    # q, k, v are views into buffers whose rows past N are NaN: an unmasked load would spread
    # NaN into the result. The views are also non-contiguous (row stride > D).
    n, pad, d = 65, 63, 32
    tensors = []
    for t in _inputs((1, 2, n, d), torch.float32, device):
        buf = torch.full((1, 2, n + pad, d), float("nan"), device=device)
        buf[:, :, :n] = t.detach()
        tensors.append(buf[:, :, :n].requires_grad_())
    got, want = _run_both(*tensors)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        check_close(name, g, w, torch.float32)


def test_timm_qkv_layout_and_gradient_through_the_permute(device, check_close):
    # timm/segmenter build q, k, v as strided views of one qkv projection.
    B, N, H, D = 1, 70, 2, 32
    x = torch.randn(B, N, 3 * H * D, generator=torch.Generator().manual_seed(0)).to(device)
    x_kernel, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    q, k, v = x_kernel.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    out = kernels.attention(q, k, v)
    rq, rk, rv = x_ref.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    ref = attention_reference(rq, rk, rv)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    out.backward(grad)
    ref.backward(grad)
    check_close("out", out, ref, torch.float32)
    check_close("dqkv", x_kernel.grad, x_ref.grad, torch.float32)


@pytest.mark.parametrize(
    "q_shape,k_shape,dtype,match",
    [
        ((1, 1, 8, 32), (1, 1, 9, 32), torch.float32, "one shape"),
        ((1, 8, 32), (1, 8, 32), torch.float32, "one shape"),
        ((1, 1, 8, 256), (1, 1, 8, 256), torch.float32, "head dims"),
        ((1, 1, 8, 32), (1, 1, 8, 32), torch.float64, "dtype"),
    ],
)
def test_rejects_bad_inputs(q_shape, k_shape, dtype, match, device):
    q = torch.randn(q_shape, dtype=dtype, device=device)
    k = torch.randn(k_shape, dtype=dtype, device=device)
    with pytest.raises(ValueError, match=match):
        kernels.attention(q, k, k)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 12, 1025, 64), (2, 12, 1174, 64), (1, 16, 1601, 64)])
def test_gpu_zoo_shapes(dtype, shape, check_close):
    # Zoo shapes: ViT-B encoder (1024 patches + cls), mask decoder (+150 classes), L at 640.
    q, k, v = _inputs(shape, dtype, "cuda")
    got, want = _run_both(q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        check_close(name, g, w, gpu_tolerance_dtype(dtype), scale=4.0)


# The CASES above run on a GPU too (the device fixture), but `-m gpu` (what `make gpu-check`
# runs) selects marked tests only: these hold the compiled kernel to the reference in every
# dtype on shapes ragged against every block config it may pick (64/128 queries, 32/64/128 keys,
# head dims padded to 16..128), a single token included.
GPU_RAGGED = [(1, 1, 1, 64), (2, 1, 17, 16), (1, 2, 65, 32), (2, 3, 197, 64), (1, 1, 300, 128),
              (1, 2, 1029, 48), (1, 1, 77, 80)]


@pytest.mark.gpu
@requires_cuda
@every_dtype
@pytest.mark.parametrize("shape", GPU_RAGGED, ids=str)
def test_gpu_ragged_shapes(dtype, shape, check_close):
    got, want = _run_both(*_inputs(shape, dtype, "cuda"))
    assert got[0].dtype == dtype and got[0].shape == shape
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        check_close(name, g, w, gpu_tolerance_dtype(dtype), scale=4.0)
