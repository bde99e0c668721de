"""Fused Segmenter mask step: L2-normalise, patch x class product, LayerNorm over classes.

Reproduces the end of segmenter's MaskTransformer.forward (the reference):

    patches = patches / patches.norm(dim=-1, keepdim=True)      # [B, N, D]
    classes = classes / classes.norm(dim=-1, keepdim=True)      # [B, C, D]
    masks = mask_norm(patches @ classes.transpose(1, 2))        # LayerNorm over C -> [B, N, C]

Forward: a small kernel computes the class norms |c_j|; then one program owns BLOCK_N patch
rows and walks the classes BLOCK_C at a time, twice: the first pass merges the rows' LayerNorm
statistics block by block, the second recomputes each block's product and writes the logits.
Tiling the class dimension keeps every live tile small (no register spills; see
`segrepro kernels compile`) where one [BLOCK_N, C padded to 256] tile did not, and pads C only
to a multiple of BLOCK_C. The norms are applied after the product,
m_ij = (p_i . c_j) / (|p_i| |c_j|), the same quantity as the reference's normalise-then-multiply.

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
recomputes the product (two passes over the class blocks, as the forward) and writes dm, r and
per-block partial sums of dw, db and s; one kernel then finishes both vector gradients, run
once for the patches (dm @ c/|c|) and once for the classes (dm^T @ p/|p|, dm read transposed).
No atomics: deterministic.

Registered as torch.library custom ops (segrepro::mask_logits_fwd/_bwd) with fake tensors,
autograd and FLOP formulas: usable under torch.compile, on the meta device and under
FlopCounterMode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import bmm_flop, register_flop_formula

from ._runtime import autotune_configs, check_device, dot_precision, on_device, upcast_tiles

_MAX_CLASSES = 1024

def _tuning(blocks, low, fp32, interp, dtype_arg):
    """Autotune candidates (the block sizes, num_warps, num_stages) per dtype; see
    _runtime.autotune_configs."""
    def spec(*values):
        return dict(zip((*blocks, "num_warps", "num_stages"), values))

    return autotune_configs([spec(*c) for c in low], [spec(*c) for c in fp32], dict(zip(blocks, interp)),
                            dtype_arg)


# BLOCK_N patch rows per program, BLOCK_C classes per step of the class loop, BLOCK_D features
# per step of the product's D loop. Tiling C (rather than holding all C, padded to 256 for
# ADE20K's 150, in one tile) is what keeps every live tile small enough for the registers.
_ROW_TUNING = _tuning(
    ("BLOCK_N", "BLOCK_C", "BLOCK_D"),
    [(32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 32, 128, 4, 3), (128, 64, 32, 8, 3)],
    [(16, 32, 32, 4, 2), (32, 32, 32, 4, 2), (32, 32, 64, 8, 2)],
    # C = 150 takes three class steps and D = 64 two D steps.
    interp=(32, 64, 32), dtype_arg="P",
)
# The backward row kernel keeps more tiles live per class block (m, xhat, dy, dm): its
# 64-row config takes 8 warps, and it has no 128-row one (both spilled with the forward's).
_BWD_ROW_TUNING = _tuning(
    ("BLOCK_N", "BLOCK_C", "BLOCK_D"),
    [(32, 64, 64, 4, 3), (64, 32, 128, 4, 3), (64, 64, 64, 8, 3)],
    [(16, 32, 32, 4, 2), (32, 32, 32, 4, 2), (32, 32, 64, 8, 2)],
    interp=(32, 64, 32), dtype_arg="P",
)
_GRAD_TUNING = _tuning(
    ("BLOCK_X", "BLOCK_Y", "BLOCK_D"),
    [(32, 32, 64, 4, 3), (64, 32, 64, 4, 3), (64, 64, 64, 8, 3)],
    [(32, 32, 32, 4, 2), (32, 32, 64, 8, 2), (64, 32, 32, 8, 2)],
    interp=(32, 32, 64), dtype_arg="S",
)
# The row-block partial buffers are sized for the smallest row block any config may pick.
_MIN_ROW_BLOCK = min(c.kwargs["BLOCK_N"] for c in _BWD_ROW_TUNING["configs"])
_NORM_BLOCK_R, _NORM_BLOCK_D = 32, 64


@triton.jit
def _norms_kernel(X, NORM, sxb, sxr, sxd, R, D,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """|x_r| in fp32 for the rows of a [B, R, D] tensor (the class vectors)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + b * sxb + offs_r[:, None] * sxr + offs_d[None, :] * sxd,
                    mask=(offs_r < R)[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    tl.store(NORM + b * R + offs_r, tl.sqrt(sq), mask=offs_r < R)


@triton.jit
def _unit_product(P, Cls, CNORM, p_norm, offs_n, mask_n, c0, spn, spd, scc, scd, C, D,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """m_ij = (p_i . c_j) / (|p_i| |c_j|) for BLOCK_N rows and the BLOCK_C classes from c0, in
    fp32, with the class indices and validity mask. Padded rows and columns are exactly 0."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
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
    c_norm = tl.load(CNORM + offs_c, mask=mask_c, other=1.0)
    valid = mask_n[:, None] & mask_c[None, :]
    # No epsilon, as the reference: a zero vector makes 0/0 = NaN here on purpose. Padded rows
    # and columns divide by 1 instead and are zeroed, so they stay out of the statistics.
    m = tl.where(valid, acc / tl.where(valid, p_norm[:, None] * c_norm[None, :], 1.0), 0.0)
    return m, offs_c, mask_c, valid


@triton.autotune(**_ROW_TUNING, key=["N", "C", "D"])
@triton.jit
def _mask_fwd_kernel(
    P, Cls, W, Bias, Y, PNORM, CNORM, MEAN, RSTD,
    spb, spn, spd, scb, scc, scd,
    N, C, D, eps,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    P += b * spb
    Cls += b * scb
    CNORM += b * C
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    p_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        p = tl.load(P + offs_n[:, None] * spn + offs_d[None, :] * spd,
                    mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
        p_sq += tl.sum(p * p, axis=1)
    p_norm = tl.sqrt(p_sq)

    # Pass 1: row mean and sum of squared deviations over C, one class block at a time,
    # merged with Chan et al.'s pairwise update (stable where sum(x^2) - n mean^2 is not).
    mean = tl.zeros([BLOCK_N], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        m, offs_c, mask_c, valid = _unit_product(
            P, Cls, CNORM, p_norm, offs_n, mask_n, c0, spn, spd, scc, scd, C, D,
            UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
        n_a = c0 * 1.0  # as fp32 (the loop index is a Python int under the interpreter)
        n_b = tl.minimum(C - c0, BLOCK_C) * 1.0
        mean_b = tl.sum(m, axis=1) / n_b
        dev = tl.where(valid, m - mean_b[:, None], 0.0)
        delta = mean_b - mean
        mean += delta * (n_b / (n_a + n_b))
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
    rstd = 1.0 / tl.sqrt(m2 / C + eps)  # biased variance, as F.layer_norm

    # Pass 2: recompute each class block (cheaper than a [B, N, C] fp32 round trip) and write.
    Y += b * N * C  # Y is [B, N, C] contiguous
    for c0 in range(0, C, BLOCK_C):
        m, offs_c, mask_c, valid = _unit_product(
            P, Cls, CNORM, p_norm, offs_n, mask_n, c0, spn, spd, scc, scd, C, D,
            UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
        w = tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        bias = tl.load(Bias + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        y = (m - mean[:, None]) * rstd[:, None] * w[None, :] + bias[None, :]
        tl.store(Y + offs_n[:, None] * C + offs_c[None, :], y.to(Y.dtype.element_ty), mask=valid)
    tl.store(PNORM + b * N + offs_n, p_norm, mask=mask_n)
    tl.store(MEAN + b * N + offs_n, mean, mask=mask_n)
    tl.store(RSTD + b * N + offs_n, rstd, mask=mask_n)


@triton.autotune(**_BWD_ROW_TUNING, key=["N", "C", "D"],
                 reset_to_zero=["DW_PART", "DB_PART", "S_PART"])
@triton.jit
def _mask_bwd_rows_kernel(
    P, Cls, W, DY, PNORM, CNORM, MEAN, RSTD, DM, R, DW_PART, DB_PART, S_PART,
    spb, spn, spd, scb, scc, scd, sdyb, sdyn, sdyc,
    N, C, D, n_part_rows,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    P += b * spb
    Cls += b * scb
    CNORM += b * C
    DY += b * sdyb
    DM += b * N * C
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    p_norm = tl.load(PNORM + b * N + offs_n, mask=mask_n, other=1.0)
    mean = tl.load(MEAN + b * N + offs_n, mask=mask_n, other=0.0)
    rstd = tl.load(RSTD + b * N + offs_n, mask=mask_n, other=0.0)

    # Pass 1: the LayerNorm backward's row sums, and the per-block partials of dw and db.
    # Recomputes the product rather than keep a [B, N, C] fp32 copy from the forward.
    c1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    part = (b * n_part_rows + pid_n) * C  # this row block's partial sums
    for c0 in range(0, C, BLOCK_C):
        m, offs_c, mask_c, valid = _unit_product(
            P, Cls, CNORM, p_norm, offs_n, mask_n, c0, spn, spd, scc, scd, C, D,
            UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
        xhat = tl.where(valid, (m - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + offs_n[:, None] * sdyn + offs_c[None, :] * sdyc,
                     mask=valid, other=0.0).to(tl.float32)
        dxhat = dy * tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        c1 += tl.sum(dxhat, axis=1)
        c2 += tl.sum(dxhat * xhat, axis=1)
        tl.store(DW_PART + part + offs_c, tl.sum(dy * xhat, axis=0), mask=mask_c)
        tl.store(DB_PART + part + offs_c, tl.sum(dy, axis=0), mask=mask_c)
    c1 = c1 / C
    c2 = c2 / C

    # Pass 2: dm, its column sums s_j (partials) and row sums r_i of dm * m.
    r = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        m, offs_c, mask_c, valid = _unit_product(
            P, Cls, CNORM, p_norm, offs_n, mask_n, c0, spn, spd, scc, scd, C, D,
            UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
        xhat = (m - mean[:, None]) * rstd[:, None]
        dy = tl.load(DY + offs_n[:, None] * sdyn + offs_c[None, :] * sdyc,
                     mask=valid, other=0.0).to(tl.float32)
        dxhat = dy * tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        dm = tl.where(valid, rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None]), 0.0)
        tl.store(DM + offs_n[:, None] * C + offs_c[None, :], dm, mask=valid)
        tl.store(S_PART + part + offs_c, tl.sum(dm * m, axis=0), mask=mask_c)
        r += tl.sum(dm * m, axis=1)
    tl.store(R + b * N + offs_n, r, mask=mask_n)


@triton.autotune(**_GRAD_TUNING, key=["X", "Y", "D"])
@triton.jit
def _mask_bwd_unit_grad_kernel(
    DM, U, UNORM, S, SNORM, COEF, DS,
    sdmb, sdmx, sdmy, sub, suy, sud, ssb, ssx, ssd,
    X, Y, D,
    DOT_PRECISION: tl.constexpr,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ds_x = (sum_y dm_xy u_y/|u_y| - coef_x s_x/|s_x|) / |s_x|, the gradient through the
    normalisation of the vectors s (one side of the product) given the other side's u.

    Patches: s = patches (X = N), u = classes (Y = C), dm as stored. Classes: s = classes,
    u = patches, dm read transposed through its strides.
    """
    pid_d = tl.program_id(0)
    pid_x = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    DM += b * sdmb
    U += b * sub
    UNORM += b * Y
    offs_x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_y = tl.arange(0, BLOCK_Y)
    mask_x = offs_x < X
    mask_d = offs_d < D

    acc = tl.zeros([BLOCK_X, BLOCK_D], dtype=tl.float32)
    for y0 in range(0, Y, BLOCK_Y):
        ys = y0 + offs_y
        mask_y = ys < Y
        dm = tl.load(DM + offs_x[:, None] * sdmx + ys[None, :] * sdmy,
                     mask=mask_x[:, None] & mask_y[None, :], other=0.0)
        u = tl.load(U + ys[:, None] * suy + offs_d[None, :] * sud,
                    mask=mask_y[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        u_norm = tl.load(UNORM + ys, mask=mask_y, other=1.0)
        acc = tl.dot(dm, u / u_norm[:, None], acc, input_precision=DOT_PRECISION)

    s_norm = tl.load(SNORM + b * X + offs_x, mask=mask_x, other=1.0)
    coef = tl.load(COEF + b * X + offs_x, mask=mask_x, other=0.0)
    s = tl.load(S + b * ssb + offs_x[:, None] * ssx + offs_d[None, :] * ssd,
                mask=mask_x[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    ds = (acc - coef[:, None] * (s / s_norm[:, None])) / s_norm[:, None]
    tl.store(DS + b * X * D + offs_x[:, None] * D + offs_d[None, :], ds.to(DS.dtype.element_ty),
             mask=mask_x[:, None] & mask_d[None, :])


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


def _norms_args(x, norm):
    B, R, D = x.shape
    return (x, norm, *x.stride(), R, D, _NORM_BLOCK_R, _NORM_BLOCK_D)


def _fwd_args(patches, classes, weight, bias, y, p_norm, c_norm, mean, rstd, eps):
    """The forward kernel's arguments: (positional, constexpr keywords); shared with kernels.compile."""
    N, D = patches.shape[1:]
    return ((patches, classes, weight, bias, y, p_norm, c_norm, mean, rstd,
             *patches.stride(), *classes.stride(), N, classes.shape[1], D, eps),
            dict(UPCAST=upcast_tiles(patches.dtype), DOT_PRECISION=dot_precision(patches.dtype)))


def _rows_args(dy, patches, classes, weight, p_norm, c_norm, mean, rstd, dm, r, dw_part, db_part, s_part):
    N, D = patches.shape[1:]
    return ((patches, classes, weight, dy, p_norm, c_norm, mean, rstd, dm, r, dw_part, db_part, s_part,
             *patches.stride(), *classes.stride(), *dy.stride(), N, classes.shape[1], D, dw_part.shape[1]),
            dict(UPCAST=upcast_tiles(patches.dtype), DOT_PRECISION=dot_precision(patches.dtype)))


def _unit_grad_args(dm, dm_strides, u, u_norm, s, s_norm, coef, ds):
    """ds for the vectors s [B, X, D], given dm ([B, X, Y] through dm_strides) and u [B, Y, D]."""
    X, D = s.shape[1:]
    return ((dm, u, u_norm, s, s_norm, coef, ds, *dm_strides, *u.stride(), *s.stride(), X, u.shape[1], D),
            dict(DOT_PRECISION=dot_precision(s.dtype)))


def mask_logits_forward(patches, classes, weight, bias, eps):
    """Launch the two forward kernels. Returns (Y [B,N,C], |p| [B,N], |c| [B,C], mean, rstd)."""
    B, N, D = patches.shape
    C = classes.shape[1]
    dev = patches.device
    y = torch.empty((B, N, C), device=dev, dtype=patches.dtype)
    p_norm, mean, rstd = (torch.empty((B, N), device=dev, dtype=torch.float32) for _ in range(3))
    c_norm = torch.empty((B, C), device=dev, dtype=torch.float32)
    _norms_kernel[(triton.cdiv(C, _NORM_BLOCK_R), B)](*_norms_args(classes, c_norm))
    args, meta = _fwd_args(patches, classes, weight, bias, y, p_norm, c_norm, mean, rstd, eps)
    _mask_fwd_kernel[lambda m: (triton.cdiv(N, m["BLOCK_N"]), B)](*args, **meta)
    return y, p_norm, c_norm, mean, rstd


def mask_logits_backward(dy, patches, classes, weight, p_norm, c_norm, mean, rstd):
    """Launch the three backward kernels. Returns (d_patches, d_classes, d_weight, d_bias)."""
    B, N, D = patches.shape
    C = classes.shape[1]
    dev = patches.device
    n_part_rows = triton.cdiv(N, _MIN_ROW_BLOCK)
    # Zero-filled: a config with a larger row block leaves the trailing partial rows unwritten.
    dw_part = torch.zeros((B, n_part_rows, C), device=dev, dtype=torch.float32)
    db_part = torch.zeros_like(dw_part)
    s_part = torch.zeros_like(dw_part)
    dm = torch.empty((B, N, C), device=dev, dtype=torch.float32)
    r = torch.empty((B, N), device=dev, dtype=torch.float32)
    args, meta = _rows_args(dy, patches, classes, weight, p_norm, c_norm, mean, rstd, dm, r,
                            dw_part, db_part, s_part)
    _mask_bwd_rows_kernel[lambda m: (triton.cdiv(N, m["BLOCK_N"]), B)](*args, **meta)
    s = s_part.sum(dim=1)
    dp = torch.empty((B, N, D), device=dev, dtype=patches.dtype)
    dc = torch.empty((B, C, D), device=dev, dtype=classes.dtype)
    for ds_args in (_unit_grad_args(dm, dm.stride(), classes, c_norm, patches, p_norm, r, dp),
                    _unit_grad_args(dm, (N * C, 1, C), patches, p_norm, classes, c_norm, s, dc)):
        X = ds_args[0][3].shape[1]
        _mask_bwd_unit_grad_kernel[
            lambda m, X=X: (triton.cdiv(D, m["BLOCK_D"]), triton.cdiv(X, m["BLOCK_X"]), B)
        ](*ds_args[0], **ds_args[1])
    dw = dw_part.sum(dim=(0, 1)).to(weight.dtype)
    db = db_part.sum(dim=(0, 1)).to(weight.dtype)
    return dp, dc, dw, db


# The kernels as torch.library custom ops (see kernels/attention.py for why). FLOPs are those
# of the reference's one product, bmm([B,N,D], [B,D,C]), as FlopCounterMode counts the torch
# path (norms and LayerNorm count nothing there), and the two products of its backward.
@torch.library.custom_op("segrepro::mask_logits_fwd", mutates_args=())
def _mask_fwd_op(patches: torch.Tensor, classes: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device(patches):
        return mask_logits_forward(patches, classes, weight, bias, eps)


@_mask_fwd_op.register_fake
def _(patches, classes, weight, bias, eps):
    (B, N, _), C = patches.shape, classes.shape[1]
    stats = [patches.new_empty(shape, dtype=torch.float32) for shape in ((B, N), (B, C), (B, N), (B, N))]
    return patches.new_empty((B, N, C)), *stats


@torch.library.custom_op("segrepro::mask_logits_bwd", mutates_args=())
def _mask_bwd_op(dy: torch.Tensor, patches: torch.Tensor, classes: torch.Tensor, weight: torch.Tensor,
                 p_norm: torch.Tensor, c_norm: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with on_device(patches):
        return mask_logits_backward(dy, patches, classes, weight, p_norm, c_norm, mean, rstd)


@_mask_bwd_op.register_fake
def _(dy, patches, classes, weight, p_norm, c_norm, mean, rstd):
    return (patches.new_empty(patches.shape), classes.new_empty(classes.shape),
            weight.new_empty(weight.shape), weight.new_empty(weight.shape))


def _setup_context(ctx, inputs, output):
    # Saves the inputs, both norms and the LayerNorm row statistics.
    patches, classes, weight, _, _ = inputs
    ctx.save_for_backward(patches, classes, weight, *output[1:])


def _backward(ctx, dy, *_stat_grads):
    return (*_mask_bwd_op(dy, *ctx.saved_tensors), None)


_mask_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.segrepro.mask_logits_fwd)
def _fwd_flops(patches_shape, classes_shape, *args, **kwargs) -> int:
    (B, N, D), C = patches_shape, classes_shape[1]
    return bmm_flop((B, N, D), (B, D, C))


@register_flop_formula(torch.ops.segrepro.mask_logits_bwd)
def _bwd_flops(dy_shape, patches_shape, classes_shape, *args, **kwargs) -> int:
    (B, N, D), C = patches_shape, classes_shape[1]
    return bmm_flop((B, N, C), (B, C, D)) + bmm_flop((B, C, N), (B, N, D))


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
    return _mask_fwd_op(patches, classes, weight, bias, float(eps))[0]


def compile_launches(dtype: torch.dtype) -> list[tuple]:
    """(kernel, positional args, constexpr keywords) of every kernel as launched on a zoo shape
    (Seg-B-Mask/16 at 512: B=1, N=1024, C=150, D=768), on CPU tensors: what kernels.compile builds."""
    B, N, C, D = 1, 1024, 150, 768
    p = torch.empty((B, N, D), dtype=dtype)
    c = torch.empty((B, C, D), dtype=dtype)
    w = torch.empty(C)
    rows, cols = torch.empty((B, N)), torch.empty((B, C))
    dm = torch.empty((B, N, C))
    part = torch.empty((B, triton.cdiv(N, _MIN_ROW_BLOCK), C))
    return [
        (_norms_kernel, _norms_args(c, cols), {}),
        (_mask_fwd_kernel, *_fwd_args(p, c, w, w, torch.empty((B, N, C), dtype=dtype), rows, cols, rows, rows,
                                      1e-5)),
        (_mask_bwd_rows_kernel, *_rows_args(torch.empty((B, N, C), dtype=dtype), p, c, w, rows, cols, rows, rows,
                                            dm, rows, part, part, part)),
        (_mask_bwd_unit_grad_kernel, *_unit_grad_args(dm, dm.stride(), c, cols, p, rows, rows, p)),
    ]
