"""Fused Segmenter mask step: L2-normalise, patch x class product, LayerNorm over classes.

Reproduces the end of segmenter's MaskTransformer.forward (the reference):

    patches = patches / patches.norm(dim=-1, keepdim=True)      # [B, N, D]
    classes = classes / classes.norm(dim=-1, keepdim=True)      # [B, C, D]
    masks = mask_norm(patches @ classes.transpose(1, 2))        # LayerNorm over C -> [B, N, C]

One program owns BLOCK_N patch rows and every class (C padded to a power of two, padded
columns kept out of the LayerNorm statistics), so the row statistics never leave registers.
The norms are applied after the product, m_ij = (p_i . c_j) / (|p_i| |c_j|), which is the same
quantity as the reference's normalise-then-multiply.

Zero vectors: like the reference there is no epsilon, so a zero patch row gives a NaN row of
logits and a zero class vector gives NaN logits for every patch of that image (the class column
is NaN and the LayerNorm statistics over C carry it into the whole row); the gradients are NaN
where the reference's are. This keeps the kernel an exact stand-in for the reference, whose
released checkpoints never produce zero vectors in practice.

Backward (x = LayerNorm input, xhat its normalised form, dy the output gradient):
    dxhat = dy * w;  dm = rstd * (dxhat - mean_C(dxhat) - xhat * mean_C(dxhat * xhat))
    dw = sum_rows(dy * xhat);  db = sum_rows(dy)
    dp_i = (sum_j dm_ij c_j/|c_j| - r_i p_i/|p_i|) / |p_i|,  r_i = sum_j dm_ij m_ij
    dc_j = (sum_i dm_ij p_i/|p_i| - s_j c_j/|c_j|) / |c_j|,  s_j = sum_i dm_ij m_ij
(the second pair is the gradient of u = x/|x|: dx = (du - u (u . du)) / |x|). A row kernel
recomputes the product, writes dm and per-block partial sums of dw, db and s, and finishes dp;
a class kernel then reduces dm^T over the rows for dc. No atomics: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import check_device, dot_precision, interpreting, on_device, upcast_tiles

_MAX_CLASSES = 1024

if interpreting():
    # One small config: nothing to tune, and D = 64 still takes two steps of the D loop.
    _ROW_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_D": 32}, num_warps=1)]
    _CLS_CONFIGS = [triton.Config({"BLOCK_N": 32, "BLOCK_CB": 64, "BLOCK_D": 32}, num_warps=1)]
else:
    _ROW_CONFIGS = [
        triton.Config({"BLOCK_N": n, "BLOCK_D": d}, num_warps=w, num_stages=s)
        for n, d, w, s in [(16, 64, 4, 3), (32, 32, 4, 3), (32, 64, 8, 3), (64, 32, 8, 2)]
    ]
    _CLS_CONFIGS = [
        triton.Config({"BLOCK_N": n, "BLOCK_CB": c, "BLOCK_D": d}, num_warps=w, num_stages=s)
        for n, c, d, w, s in [(32, 32, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 64, 8, 3)]
    ]
# The row-block partial buffers are sized for the smallest row block any config may pick.
_MIN_ROW_BLOCK = min(c.kwargs["BLOCK_N"] for c in _ROW_CONFIGS)


@triton.jit
def _raw_product(P, Cls, offs_n, offs_c, mask_n, mask_c, spn, spd, scc, scd, D,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """p_i . c_j for a [BLOCK_N, BLOCK_C] tile plus sum_d p_id^2 and sum_d c_jd^2, in fp32."""
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    p_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    c_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        p = tl.load(P + offs_n[:, None] * spn + offs_d[None, :] * spd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        c = tl.load(Cls + offs_c[:, None] * scc + offs_d[None, :] * scd,
                    mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(p, tl.trans(c), acc, input_precision=DOT_PRECISION)
        pf = p.to(tl.float32)
        cf = c.to(tl.float32)
        p_sq += tl.sum(pf * pf, axis=1)
        c_sq += tl.sum(cf * cf, axis=1)
    return acc, p_sq, c_sq


@triton.autotune(configs=_ROW_CONFIGS, key=["N", "C", "D"])
@triton.jit
def _mask_fwd_kernel(
    P, Cls, W, Bias, Y, PNORM, CNORM, MEAN, RSTD,
    spb, spn, spd, scb, scc, scd,
    N, C, D, eps,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    P += b * spb
    Cls += b * scb
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    valid = mask_n[:, None] & mask_c[None, :]

    acc, p_sq, c_sq = _raw_product(P, Cls, offs_n, offs_c, mask_n, mask_c, spn, spd, scc, scd,
                                   D, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
    p_norm = tl.sqrt(p_sq)
    c_norm = tl.sqrt(c_sq)
    # No epsilon, as the reference: a zero vector makes 0/0 = NaN here on purpose. Padded rows
    # and columns divide by 1 instead and are zeroed, so they stay out of the statistics.
    denom = tl.where(valid, p_norm[:, None] * c_norm[None, :], 1.0)
    m = tl.where(valid, acc / denom, 0.0)
    mean = tl.sum(m, axis=1) / C
    xc = tl.where(valid, m - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)  # biased variance, as F.layer_norm
    w = tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    bias = tl.load(Bias + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + bias[None, :]

    # Y, PNORM, MEAN, RSTD are [B, N, C] / [B, N] contiguous; CNORM is [B, C].
    tl.store(Y + b * N * C + offs_n[:, None] * C + offs_c[None, :], y.to(Y.dtype.element_ty),
             mask=valid)
    tl.store(PNORM + b * N + offs_n, p_norm, mask=mask_n)
    tl.store(MEAN + b * N + offs_n, mean, mask=mask_n)
    tl.store(RSTD + b * N + offs_n, rstd, mask=mask_n)
    if pid_n == 0:
        tl.store(CNORM + b * C + offs_c, c_norm, mask=mask_c)


@triton.autotune(configs=_ROW_CONFIGS, key=["N", "C", "D"],
                 reset_to_zero=["DW_PART", "DB_PART", "S_PART"])
@triton.jit
def _mask_bwd_rows_kernel(
    P, Cls, W, DY, PNORM, CNORM, MEAN, RSTD, DP, DM, DW_PART, DB_PART, S_PART,
    spb, spn, spd, scb, scc, scd, sdyb, sdyn, sdyc,
    N, C, D, n_part_rows,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    P += b * spb
    Cls += b * scb
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    valid = mask_n[:, None] & mask_c[None, :]

    # Recompute the product rather than keep a [B, N, C] fp32 copy from the forward.
    acc, _, _ = _raw_product(P, Cls, offs_n, offs_c, mask_n, mask_c, spn, spd, scc, scd,
                             D, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
    p_norm = tl.load(PNORM + b * N + offs_n, mask=mask_n, other=1.0)
    c_norm = tl.load(CNORM + b * C + offs_c, mask=mask_c, other=1.0)
    mean = tl.load(MEAN + b * N + offs_n, mask=mask_n, other=0.0)
    rstd = tl.load(RSTD + b * N + offs_n, mask=mask_n, other=0.0)
    m = tl.where(valid, acc / (p_norm[:, None] * c_norm[None, :]), 0.0)
    xhat = (m - mean[:, None]) * rstd[:, None]

    dy = tl.load(DY + b * sdyb + offs_n[:, None] * sdyn + offs_c[None, :] * sdyc,
                 mask=valid, other=0.0).to(tl.float32)
    w = tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    dxhat = dy * w[None, :]
    c1 = tl.sum(dxhat, axis=1) / C
    c2 = tl.sum(dxhat * xhat, axis=1) / C
    # Padded columns hold junk in xhat and dm, but everything they meet is 0 there (dy, w, m
    # and the zero-loaded class rows), and their dm is never stored: no mask needed.
    dm = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])

    part = (b * n_part_rows + pid_n) * C + offs_c
    tl.store(DW_PART + part, tl.sum(dy * xhat, axis=0), mask=mask_c)
    tl.store(DB_PART + part, tl.sum(dy, axis=0), mask=mask_c)
    tl.store(S_PART + part, tl.sum(dm * m, axis=0), mask=mask_c)
    tl.store(DM + b * N * C + offs_n[:, None] * C + offs_c[None, :], dm, mask=valid)

    r = tl.sum(dm * m, axis=1)
    DP += b * N * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        c = tl.load(Cls + offs_c[:, None] * scc + offs_d[None, :] * scd,
                    mask=mask_c[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        p = tl.load(P + offs_n[:, None] * spn + offs_d[None, :] * spd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        p_unit = p / p_norm[:, None]
        dp_unit = tl.dot(dm, c / c_norm[:, None], input_precision=DOT_PRECISION)
        dp = (dp_unit - r[:, None] * p_unit) / p_norm[:, None]
        tl.store(DP + offs_n[:, None] * D + offs_d[None, :], dp.to(DP.dtype.element_ty),
                 mask=mask_n[:, None] & mask_d[None, :])


@triton.autotune(configs=_CLS_CONFIGS, key=["N", "C", "D"])
@triton.jit
def _mask_bwd_classes_kernel(
    P, Cls, PNORM, CNORM, DM, S, DC,
    spb, spn, spd, scb, scc, scd,
    N, C, D,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_CB: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    P += b * spb
    Cls += b * scb
    offs_c = pid_c * BLOCK_CB + tl.arange(0, BLOCK_CB)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_N)
    mask_c = offs_c < C
    mask_d = offs_d < D

    acc = tl.zeros([BLOCK_CB, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_r
        mask_n = rows < N
        dm = tl.load(DM + b * N * C + rows[:, None] * C + offs_c[None, :],
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        p = tl.load(P + rows[:, None] * spn + offs_d[None, :] * spd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        p_norm = tl.load(PNORM + b * N + rows, mask=mask_n, other=1.0)
        acc = tl.dot(tl.trans(dm), p / p_norm[:, None], acc, input_precision=DOT_PRECISION)

    c_norm = tl.load(CNORM + b * C + offs_c, mask=mask_c, other=1.0)
    s = tl.load(S + b * C + offs_c, mask=mask_c, other=0.0)
    c = tl.load(Cls + offs_c[:, None] * scc + offs_d[None, :] * scd,
                mask=mask_c[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    dc = (acc - s[:, None] * (c / c_norm[:, None])) / c_norm[:, None]
    tl.store(DC + b * C * D + offs_c[:, None] * D + offs_d[None, :], dc.to(DC.dtype.element_ty),
             mask=mask_c[:, None] & mask_d[None, :])


def _check(patches, classes, weight, bias) -> None:
    if patches.dim() != 3 or classes.dim() != 3 or patches.shape[0] != classes.shape[0] \
            or patches.shape[2] != classes.shape[2]:
        raise ValueError(
            "mask_logits expects patches [B, N, D] and classes [B, C, D]; got "
            f"{tuple(patches.shape)} and {tuple(classes.shape)}"
        )
    C = classes.shape[1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(
            f"mask_logits expects weight and bias of shape ({C},); got "
            f"{tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if not 1 <= C <= _MAX_CLASSES:
        raise ValueError(f"mask_logits supports 1..{_MAX_CLASSES} classes; got {C}")
    if patches.dtype != classes.dtype or patches.dtype not in (
        torch.float32, torch.float16, torch.bfloat16
    ):
        raise ValueError(
            "mask_logits expects patches and classes of one dtype among fp32/fp16/bf16; got "
            f"{patches.dtype} and {classes.dtype}"
        )
    check_device(patches, classes, weight, bias)


def _block_c(n_cls: int) -> int:
    return max(16, triton.next_power_of_2(n_cls))


def mask_logits_forward(patches, classes, weight, bias, eps):
    """Launch the forward kernel. Returns (Y [B,N,C], |p| [B,N], |c| [B,C], mean, rstd)."""
    B, N, D = patches.shape
    C = classes.shape[1]
    dev = patches.device
    y = torch.empty((B, N, C), device=dev, dtype=patches.dtype)
    p_norm = torch.empty((B, N), device=dev, dtype=torch.float32)
    c_norm = torch.empty((B, C), device=dev, dtype=torch.float32)
    mean = torch.empty((B, N), device=dev, dtype=torch.float32)
    rstd = torch.empty((B, N), device=dev, dtype=torch.float32)
    _mask_fwd_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B)](
        patches, classes, weight, bias, y, p_norm, c_norm, mean, rstd,
        *patches.stride(), *classes.stride(), N, C, D, eps,
        UPCAST=upcast_tiles(patches.dtype), DOT_PRECISION=dot_precision(patches.dtype),
        BLOCK_C=_block_c(C),
    )
    return y, p_norm, c_norm, mean, rstd


def mask_logits_backward(dy, patches, classes, weight, p_norm, c_norm, mean, rstd):
    """Launch the two backward kernels. Returns (d_patches, d_classes, d_weight, d_bias)."""
    B, N, D = patches.shape
    C = classes.shape[1]
    dev = patches.device
    precision = dot_precision(patches.dtype)
    n_part_rows = triton.cdiv(N, _MIN_ROW_BLOCK)
    # Zero-filled: a config with a larger row block leaves the trailing partial rows unwritten.
    dw_part = torch.zeros((B, n_part_rows, C), device=dev, dtype=torch.float32)
    db_part = torch.zeros_like(dw_part)
    s_part = torch.zeros_like(dw_part)
    dm = torch.empty((B, N, C), device=dev, dtype=torch.float32)
    dp = torch.empty((B, N, D), device=dev, dtype=patches.dtype)
    _mask_bwd_rows_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B)](
        patches, classes, weight, dy, p_norm, c_norm, mean, rstd, dp, dm,
        dw_part, db_part, s_part,
        *patches.stride(), *classes.stride(), *dy.stride(), N, C, D, n_part_rows,
        UPCAST=upcast_tiles(patches.dtype), DOT_PRECISION=precision, BLOCK_C=_block_c(C),
    )
    s = s_part.sum(dim=1)
    dc = torch.empty((B, C, D), device=dev, dtype=classes.dtype)
    _mask_bwd_classes_kernel[
        lambda meta: (triton.cdiv(D, meta["BLOCK_D"]), triton.cdiv(C, meta["BLOCK_CB"]), B)
    ](
        patches, classes, p_norm, c_norm, dm, s, dc,
        *patches.stride(), *classes.stride(), N, C, D,
        DOT_PRECISION=precision,
    )
    dw = dw_part.sum(dim=(0, 1)).to(weight.dtype)
    db = db_part.sum(dim=(0, 1)).to(weight.dtype)
    return dp, dc, dw, db


class MaskLogitsFunction(torch.autograd.Function):
    """autograd wrapper: saves the inputs, both norms and the LayerNorm row statistics."""

    @staticmethod
    def forward(ctx, patches, classes, weight, bias, eps):
        with on_device(patches):
            y, p_norm, c_norm, mean, rstd = mask_logits_forward(
                patches, classes, weight, bias, eps
            )
        ctx.save_for_backward(patches, classes, weight, p_norm, c_norm, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        patches, classes, weight, p_norm, c_norm, mean, rstd = ctx.saved_tensors
        with on_device(patches):
            dp, dc, dw, db = mask_logits_backward(
                dy, patches, classes, weight, p_norm, c_norm, mean, rstd
            )
        return dp, dc, dw, db, None


def mask_logits(
    patches: torch.Tensor,
    classes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm_C(normalize(patches) @ normalize(classes)^T); [B,N,D], [B,C,D] -> [B,N,C].

    weight and bias are the LayerNorm's [C] parameters (segmenter's `mask_norm`). The result is
    contiguous, in the inputs' dtype, and differentiable in all four tensors. A zero patch or
    class vector gives NaN, exactly as the reference (see the module docstring).
    """
    _check(patches, classes, weight, bias)
    return MaskLogitsFunction.apply(patches, classes, weight, bias, float(eps))
