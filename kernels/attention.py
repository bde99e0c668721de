"""Fused non-causal attention, FlashAttention-2 style (Dao 2023), forward and backward.

softmax(Q K^T * scale) V over [B, H, N, D] tensors without materialising the N x N matrix.

- Forward: FlashAttention-2 Algorithm 1. One program per (query block, batch*head) walks the
  key blocks with an online softmax; it saves the row log-sum-exp (base 2) for the backward.
- Backward: FlashAttention-2 Algorithm 2 split into three launches, as in Triton's fused
  attention tutorial: delta = rowsum(dO * O); one program per key block accumulates dK and dV
  over all query blocks; one program per query block accumulates dQ over all key blocks. No
  atomics, so the gradients are deterministic.
- Any N: every load and store is masked; keys past N get score -inf (weight 0), never score 0,
  which would still take part in the normalisation.
- fp32/fp16/bf16 inputs, fp32 accumulation, output and gradients in the input dtype.
- Registered as torch.library custom ops (segrepro::flash_attention_fwd/_bwd) with fake
  tensors, autograd and FLOP formulas: usable under torch.compile, on the meta device and
  under FlopCounterMode.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from ._runtime import autotune_configs, check_device, dot_precision, on_device, upcast_tiles

_LOG2E = math.log2(math.e)
_MAX_HEAD_DIM = 128


def _tuning(low, fp32, interp):
    """Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per dtype (see
    _runtime.autotune_configs). BLOCK_M != BLOCK_N under the interpreter so that swapped
    query/key masks would show."""
    def spec(m, n, w, s):
        return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}

    return autotune_configs([spec(*c) for c in low], [spec(*c) for c in fp32],
                            {"BLOCK_M": interp[0], "BLOCK_N": interp[1]}, dtype_arg="Q")


# BLOCK_M: queries per program, BLOCK_N: keys per inner step.
_FWD_TUNING = _tuning(
    [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
    [(32, 32, 4, 2), (64, 32, 8, 2), (32, 64, 8, 2)],
    interp=(64, 32),
)
# dK/dV: BLOCK_N keys per program, BLOCK_M queries per inner step.
_DKDV_TUNING = _tuning(
    [(32, 64, 4, 3), (32, 128, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2)],
    [(16, 32, 4, 2), (32, 32, 8, 2), (32, 64, 8, 2)],
    interp=(32, 64),
)
_DQ_TUNING = _tuning(
    [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)],
    [(32, 16, 4, 2), (32, 32, 8, 2), (64, 32, 8, 2)],
    interp=(64, 32),
)
_PRE_BLOCK_M = 64


@triton.autotune(**_FWD_TUNING, key=["N", "HEAD_DIM"])
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    H, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 bases: B*H*N*D exceeds 2**31 elements at the larger zoo batch sizes.
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * sqb + off_h * sqh
    K += off_b * skb + off_h * skh
    V += off_b * svb + off_h * svh
    O += off_b * sob + off_h * soh
    LSE += pid_bh.to(tl.int64) * N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM

    q = tl.load(Q + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + cols[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # Scores in base 2 (scale * log2 e folded in) so the softmax uses exp2.
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every block holds at least one real key, so m_new is finite from the first block on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * son + offs_d[None, :] * sod, acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    sob, soh, son, sod,
    sdob, sdoh, sdon, sdod,
    H, N,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = sum_d dO_id O_id = rowsum(dP * P), FlashAttention-2 Algorithm 2 line 4.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + off_b * sob + off_h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * sdob + off_h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, tl.sum(o * do, axis=1), mask=offs_m < N)


@triton.autotune(**_DKDV_TUNING, key=["N", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * sqb + off_h * sqh
    K += off_b * skb + off_h * skh
    V += off_b * svb + off_h * svh
    DO += off_b * sdob + off_h * sdoh
    LSE += pid_bh.to(tl.int64) * N
    DELTA += pid_bh.to(tl.int64) * N
    # dK, dV are allocated contiguous [B, H, N, D].
    DK += pid_bh.to(tl.int64) * N * HEAD_DIM
    DV += pid_bh.to(tl.int64) * N * HEAD_DIM

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + rows[:, None] * sqn + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
        do = tl.load(DO + rows[:, None] * sdon + offs_d[None, :] * sdod, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + rows, mask=mask_m, other=0.0)
        # Transposed tiles (keys x queries) so dK and dV accumulate without a transpose of P.
        # Queries past N load q = dO = 0 and lse = delta = 0, so their P column is exactly 1
        # and everything it multiplies is 0: they add nothing and need no mask.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    out = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(**_DQ_TUNING, key=["N", "HEAD_DIM"])
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * sqb + off_h * sqh
    K += off_b * skb + off_h * skh
    V += off_b * svb + off_h * svh
    DO += off_b * sdob + off_h * sdoh
    LSE += pid_bh.to(tl.int64) * N
    DELTA += pid_bh.to(tl.int64) * N
    DQ += pid_bh.to(tl.int64) * N * HEAD_DIM

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + cols[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # Keys past N had weight 0 in the forward. Recomputed, they score 0 and exp2(0 - lse)
        # overflows to inf when every real score is very negative; inf * (k = 0) is NaN.
        p = tl.where(mask_n[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(DQ + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "attention expects q, k, v of one shape [B, H, N, D]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (
        torch.float32, torch.float16, torch.bfloat16
    ):
        raise ValueError(
            f"attention expects q, k, v of one dtype among fp32/fp16/bf16; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not 1 <= q.shape[-1] <= _MAX_HEAD_DIM:
        raise ValueError(f"attention supports head dims 1..{_MAX_HEAD_DIM}; got {q.shape[-1]}")
    check_device(q, k, v)


def _block_d(head_dim: int) -> int:
    # tl.dot needs every block dimension >= 16.
    return max(16, triton.next_power_of_2(head_dim))


def _fwd_args(q, k, v, o, lse, scale):
    """The forward kernel's arguments: (positional, constexpr keywords); shared with kernels.compile."""
    B, H, N, D = q.shape
    return ((q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, N, scale * _LOG2E),
            dict(HEAD_DIM=D, BLOCK_D=_block_d(D), UPCAST=upcast_tiles(q.dtype),
                 DOT_PRECISION=dot_precision(q.dtype)))


def _pre_args(o, do, delta):
    B, H, N, D = o.shape
    return (o, do, delta, *o.stride(), *do.stride(), H, N, D, _block_d(D), _PRE_BLOCK_M)


def _bwd_args(q, k, v, do, scale):
    """The dK/dV and dQ kernels' common arguments (after their own output pointers)."""
    B, H, N, D = q.shape
    return ((*q.stride(), *k.stride(), *v.stride(), *do.stride(), H, N, scale * _LOG2E, scale),
            dict(HEAD_DIM=D, BLOCK_D=_block_d(D), UPCAST=upcast_tiles(q.dtype),
                 DOT_PRECISION=dot_precision(q.dtype)))


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns (O [B,H,N,D] in q.dtype, LSE [B,H,N] fp32, base 2)."""
    B, H, N, D = q.shape
    o = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    args, meta = _fwd_args(q, k, v, o, lse, scale)
    _attn_fwd_kernel[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)](*args, **meta)
    return o, lse


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels. Returns (dQ, dK, dV), contiguous, in q.dtype."""
    B, H, N, D = q.shape
    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    _attn_bwd_preprocess_kernel[(triton.cdiv(N, _PRE_BLOCK_M), B * H)](*_pre_args(o, do, delta))
    dq = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    args, meta = _bwd_args(q, k, v, do, scale)
    _attn_bwd_dkdv_kernel[lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * H)](
        q, k, v, do, lse, delta, dk, dv, *args, **meta)
    _attn_bwd_dq_kernel[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, dq, *args, **meta)
    return dq, dk, dv


def compile_launches(dtype: torch.dtype) -> list[tuple]:
    """(kernel, positional args, constexpr keywords) of every kernel as launched on a zoo shape
    (ViT-B/16 at 512: B=1, H=12, N=1025, D=64), on CPU tensors: what kernels.compile builds."""
    q = torch.empty((1, 12, 1025, 64), dtype=dtype)
    lse = torch.empty((1, 12, 1025), dtype=torch.float32)
    args, meta = _bwd_args(q, q, q, q, 0.125)
    return [
        (_attn_fwd_kernel, *_fwd_args(q, q, q, q, lse, 0.125)),
        (_attn_bwd_preprocess_kernel, _pre_args(q, q, lse), {}),
        (_attn_bwd_dkdv_kernel, (q, q, q, q, lse, lse, q, q, *args), meta),
        (_attn_bwd_dq_kernel, (q, q, q, q, lse, lse, q, *args), meta),
    ]


# The kernels as torch.library custom ops: opaque to autograd (register_autograd below),
# traceable by torch.compile and on the meta device (register_fake), and counted by
# torch.utils.flop_counter with the formulas torch uses for its own SDPA, so FlopCounterMode
# counts the Triton path exactly as the torch path.
@torch.library.custom_op("segrepro::flash_attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    with on_device(q):
        return attention_forward(q, k, v, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("segrepro::flash_attention_bwd", mutates_args=())
def _attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device(q):
        return attention_backward(do, q, k, v, o, lse, scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward(ctx, do, _dlse):
    # Saves Q, K, V, O and the base-2 LSE; the backward recomputes P (FlashAttention-2).
    q, k, v, o, lse = ctx.saved_tensors
    return (*_attention_bwd_op(do, q, k, v, o, lse, ctx.scale), None)


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.segrepro.flash_attention_fwd)
def _fwd_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


@register_flop_formula(torch.ops.segrepro.flash_attention_bwd)
def _bwd_flops(do_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(do_shape, q_shape, k_shape, v_shape)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v for [B, H, N, D] q, k, v (any strides); differentiable.

    scale defaults to D**-0.5. Returns a contiguous [B, H, N, D] tensor in the input dtype.
    """
    _check(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _attention_fwd_op(q, k, v, float(scale))[0]
