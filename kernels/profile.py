"""`segrepro kernels profile`: time the Triton kernels on the zoo's shapes, or check them.

With a CUDA GPU: every shape is timed with triton.testing.do_bench (median, 20th and 80th
percentile) for the Triton kernel, each torch SDPA backend that accepts it, and the PyTorch
reference, forward and backward; results carry TFLOP/s, GB/s and the fraction of the GPU's
measured peak (kernels.device.measured_peak), as long-format rows (one per shape x impl x
direction x stat).

Without a CUDA GPU nothing is timed (interpreter timings would mean nothing). One line says
so, then the same Triton source runs under TRITON_INTERPRET=1 on small shapes and is checked
against the references (forward and every gradient, fp32 and fp16 unless --dtype is given);
the exit status is 1 if any check fails.

This module measures and prints; the command (harness.cli) writes the rows as CSV to --out
(``csv_text``) and, with --tracking-uri, to MLflow (harness.tracking): kernels/ imports
neither harness nor MLflow.

--shapes is "zoo" (the default) or a SPEC: shapes separated by ";", each KIND:FIELD=INT,...
    attn:B=8,H=12,N=1025,D=64          attention over [B, H, N, D]   (D <= 128)
    mask:B=8,N=1024,C=150,D=768        mask step, patches [B, N, D], classes [B, C, D]
e.g. --shapes "attn:B=8,H=12,N=1025,D=64;mask:B=8,N=1024,C=150,D=768". Without a GPU a SPEC
replaces the default check shapes (keep them small: the interpreter is slow).

FLOPs counted: attention 4*B*H*N^2*D forward, 2.5x that backward (FlashAttention-2's
convention); mask step 2*B*N*C*D forward (the product), 2x that backward (the two products
for the patch and class gradients). Bytes counted: tensors read and written at the interface
(attention fwd q, k, v, o; bwd q, k, v, o, dO, dq, dk, dv; mask fwd patches, classes, weight,
bias, logits; bwd those inputs, d_logits and the four gradients), not internal traffic.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
from pathlib import Path

import torch

from ._runtime import interpreting
from .attention import attention as triton_attention
from .device import device_facts, measured_peak
from .mask_decoder import mask_logits as triton_mask_logits
from .reference import attention_reference, mask_logits_reference

ZOO_IMAGE_SIZES = (512, 640)
ZOO_BATCHES = (1, 2, 4, 8, 16, 32)
QUANTILES = (0.5, 0.2, 0.8)
STATS = ("median", "p20", "p80")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Allowed max abs error relative to max(1, max |reference|): a few ulps of the dtype at the
# magnitudes the small check shapes produce (observed errors are 10-50x below these).
CHECK_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 4e-2}
CSV_NAME = {"gpu": "kernels_profile.csv", "check": "kernels_check.csv"}  # the files under --out
NO_GPU_LINE = (
    "No CUDA GPU is available, so nothing is timed{zoo}; running the Triton interpreter "
    "correctness check instead."
)


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """What the profiler needs of one zoo model; the CLI builds these from the zoo configs."""

    name: str
    d_model: int
    n_heads: int
    patch_size: int
    n_extra_tokens: int  # cls, plus dist for distilled DeiT
    n_cls: int
    decoder: str  # "mask" or "linear"
    n_dec_heads: int


@dataclasses.dataclass(frozen=True)
class AttnShape:
    B: int
    H: int
    N: int
    D: int
    kind = "attn"

    @property
    def label(self) -> str:
        return f"attn:B={self.B},H={self.H},N={self.N},D={self.D}"


@dataclasses.dataclass(frozen=True)
class MaskShape:
    B: int
    N: int
    C: int
    D: int
    kind = "mask"

    @property
    def label(self) -> str:
        return f"mask:B={self.B},N={self.N},C={self.C},D={self.D}"


Shape = AttnShape | MaskShape
_SPEC_FIELDS = {"attn": ("B", "H", "N", "D"), "mask": ("B", "N", "C", "D")}
_SPEC_LIMITS = {"attn": ("D", 128), "mask": ("C", 1024)}
# Small enough for the interpreter (a few seconds each), ragged against every block size.
CHECK_SHAPES = (AttnShape(1, 2, 65, 64), AttnShape(2, 1, 100, 32), MaskShape(2, 65, 150, 64))


class SpecError(ValueError):
    """A --shapes value that cannot be used; the message names the offending token."""


class ProfileError(ValueError):
    """A `kernels profile` request that cannot run here; the message says which option and why."""


@dataclasses.dataclass
class Profile:
    """What one `kernels profile` produced: ``kind`` "gpu" (timing rows) or "check" (the
    interpreter correctness check's rows), and the device facts."""

    kind: str
    rows: list[dict]
    facts: dict

    @property
    def passed(self) -> bool:
        return self.kind == "gpu" or all(r["passed"] for r in self.rows)


def parse_spec(spec: str) -> list[Shape]:
    """Parse a SPEC (see the module docstring) into shapes, in order, duplicates dropped."""
    tokens = [t.strip() for t in spec.split(";") if t.strip()]
    if not tokens:
        raise SpecError(f"empty shape spec {spec!r}; expected e.g. attn:B=8,H=12,N=1025,D=64")
    shapes: list[Shape] = []
    for token in tokens:
        kind, sep, body = token.partition(":")
        kind = kind.strip().lower()
        if not sep or kind not in _SPEC_FIELDS:
            raise SpecError(
                f"bad shape token {token!r}: expected attn:B=..,H=..,N=..,D=.. or "
                "mask:B=..,N=..,C=..,D=.."
            )
        fields = _SPEC_FIELDS[kind]
        values: dict[str, int] = {}
        for item in body.split(","):
            key, eq, raw = item.partition("=")
            key = key.strip().upper()
            if not eq or key not in fields:
                raise SpecError(
                    f"bad shape token {token!r}: field {item.strip()!r} is not one of "
                    f"{','.join(fields)} as {kind}:{'=..,'.join(fields)}=.."
                )
            if key in values:
                raise SpecError(f"bad shape token {token!r}: {key} given twice")
            try:
                value = int(raw.strip())
            except ValueError:
                raise SpecError(
                    f"bad shape token {token!r}: {key}={raw.strip()!r} is not an integer"
                ) from None
            if value < 1:
                raise SpecError(f"bad shape token {token!r}: {key}={value} must be >= 1")
            values[key] = value
        missing = [f for f in fields if f not in values]
        if missing:
            raise SpecError(f"bad shape token {token!r}: missing {','.join(missing)}")
        field, limit = _SPEC_LIMITS[kind]
        if values[field] > limit:
            raise SpecError(
                f"bad shape token {token!r}: {field}={values[field]} exceeds the kernel's "
                f"limit of {limit}"
            )
        shape = AttnShape(**values) if kind == "attn" else MaskShape(**values)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def zoo_shapes(
    models: list[ModelDims],
    batches: tuple[int, ...] = ZOO_BATCHES,
    image_sizes: tuple[int, ...] = ZOO_IMAGE_SIZES,
) -> dict[Shape, list[str]]:
    """The zoo's kernel shapes, each mapped to the model sites that use it.

    Per model and image size S: encoder attention over (S/p)^2 + extra tokens with head dim
    d_model/n_heads; for a mask decoder, its attention over (S/p)^2 + n_cls tokens and the mask
    step over (S/p)^2 patches, n_cls classes and d_model.
    """
    if not models:
        raise SpecError("--shapes zoo needs the zoo's model list, and it is empty")
    shapes: dict[Shape, list[str]] = {}
    for m in models:
        if m.decoder not in ("mask", "linear"):
            raise SpecError(f"zoo model {m.name!r}: decoder {m.decoder!r} is not mask or linear")
        heads = [("n_heads", m.n_heads)]
        if m.decoder == "mask":
            heads.append(("n_dec_heads", m.n_dec_heads))
        for what, h in heads:
            if h < 1 or m.d_model % h or m.d_model // h > _SPEC_LIMITS["attn"][1]:
                raise SpecError(f"zoo model {m.name!r}: d_model {m.d_model} / {what} {h} is "
                                f"not a head dim of 1..{_SPEC_LIMITS['attn'][1]}")
        if m.decoder == "mask" and not 1 <= m.n_cls <= _SPEC_LIMITS["mask"][1]:
            raise SpecError(f"zoo model {m.name!r}: n_cls {m.n_cls} is outside "
                            f"1..{_SPEC_LIMITS['mask'][1]}")
        for size in image_sizes:
            if size % m.patch_size:
                raise SpecError(f"zoo model {m.name!r}: image size {size} is not a multiple "
                                f"of patch size {m.patch_size}")
            n_patches = (size // m.patch_size) ** 2
            for b in batches:
                sites = [(AttnShape(b, m.n_heads, n_patches + m.n_extra_tokens,
                                    m.d_model // m.n_heads), "encoder")]
                if m.decoder == "mask":
                    sites.append((AttnShape(b, m.n_dec_heads, n_patches + m.n_cls,
                                            m.d_model // m.n_dec_heads), "decoder"))
                    sites.append((MaskShape(b, n_patches, m.n_cls, m.d_model), "mask step"))
                for shape, site in sites:
                    shapes.setdefault(shape, []).append(f"{m.name} {site}@{size}")
    return shapes


def attention_flops(s: AttnShape, direction: str) -> float:
    fwd = 4.0 * s.B * s.H * s.N * s.N * s.D
    return fwd if direction == "fwd" else 2.5 * fwd


def mask_flops(s: MaskShape, direction: str) -> float:
    fwd = 2.0 * s.B * s.N * s.C * s.D
    return fwd if direction == "fwd" else 2.0 * fwd


def interface_bytes(s: Shape, direction: str, elt: int) -> float:
    """Bytes of the tensors read and written at the kernel's interface (params in fp32)."""
    if isinstance(s, AttnShape):
        return (4 if direction == "fwd" else 8) * s.B * s.H * s.N * s.D * elt
    patches, classes, logits = s.B * s.N * s.D, s.B * s.C * s.D, s.B * s.N * s.C
    if direction == "fwd":
        return (patches + classes + logits) * elt + 2 * s.C * 4
    return (2 * patches + 2 * classes + logits) * elt + 3 * s.C * 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `segrepro kernels profile`."""
    parser.add_argument(
        "--shapes", default="zoo",
        help='"zoo" (every zoo model at 512 and 640, batch 1..32) or a SPEC such as '
             '"attn:B=8,H=12,N=1025,D=64;mask:B=8,N=1024,C=150,D=768"',
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None,
        help="input dtype (default: fp16 on a GPU; fp32 and fp16 for the no-GPU check)",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the CSV (kernels_profile.csv / kernels_check.csv)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI; logs device facts, metrics and the CSV")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout (messages go to stderr)")


def measure(args: argparse.Namespace, zoo_models: list[ModelDims]) -> Profile:
    """Time the shapes of ``args`` on the GPU, or run the correctness check without one.
    Raises ProfileError for options that cannot run here."""
    from . import mode

    try:
        if args.shapes.strip().lower() == "zoo":
            zoo = zoo_shapes(zoo_models)
            shapes, used_by = list(zoo), zoo
        else:
            zoo = None
            shapes = parse_spec(args.shapes)
            used_by = {}
    except SpecError as e:
        raise ProfileError(f"--shapes: {e}") from None

    if mode() == "cuda":
        rows, facts = profile_gpu(shapes, DTYPES[args.dtype or "fp16"], used_by)
        return Profile("gpu", rows, facts)
    if mode() == "interpreter" and not torch.cuda.is_available():
        zoo_note = f" (the zoo has {len(zoo)} kernel shapes)" if zoo is not None else ""
        print(NO_GPU_LINE.format(zoo=zoo_note), file=sys.stderr if args.json else sys.stdout)
        check = list(CHECK_SHAPES) if zoo is not None else shapes
        dtypes = [args.dtype] if args.dtype else ["fp32", "fp16"]
        return Profile("check", correctness_check(check, dtypes, progress=sys.stderr), device_facts())
    raise ProfileError(
        "cannot run: " + ("TRITON_INTERPRET=1 is set on a GPU machine; unset it to time the compiled kernels"
                          if torch.cuda.is_available() else
                          "no CUDA GPU and TRITON_INTERPRET is disabled; unset it or set it to 1"))


def show(profile: Profile, as_json: bool, csv_path: Path | None) -> None:
    """The rows on stdout: a table (and where the CSV went), or JSON."""
    if as_json:
        print(json.dumps({"kind": profile.kind, "device": profile.facts, "rows": _json_safe(profile.rows),
                          "passed": profile.passed}, indent=2, default=str))
        return
    print(format_table(profile.rows, profile.kind))
    if csv_path is not None:
        print(f"wrote {csv_path}")


# --------------------------------------------------------------------------- no-GPU check

def correctness_check(shapes: list[Shape], dtypes: list[str], progress=None) -> list[dict]:
    """Kernel vs reference on each shape and dtype: max abs error of the output and each grad.

    The reference runs in fp32 on fp32 copies of the same low-precision inputs, so the error
    is the kernel's alone. One row per shape x dtype x output.
    """
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            if progress is not None:
                print(f"checking {shape.label} {dtype_name}", file=progress, flush=True)
            pairs = _check_pairs(shape, DTYPES[dtype_name])
            for output, (got, want) in pairs.items():
                err = (got.float() - want).abs().max().item()
                ref_max = want.abs().max().item()
                limit = CHECK_TOLERANCE[dtype_name] * max(1.0, ref_max)
                rows.append({
                    "kernel": shape.kind, "shape": shape.label, "dtype": dtype_name,
                    "output": output, "max_abs_err": err, "ref_max_abs": ref_max,
                    "limit": limit, "passed": bool(err <= limit),  # NaN fails
                })
    return rows


def _check_pairs(shape: Shape, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    # drawn on the CPU (the same numbers everywhere), checked where the kernels run
    device = "cpu" if interpreting() else "cuda"
    gen = torch.Generator().manual_seed(0)
    if isinstance(shape, AttnShape):
        dims = (shape.B, shape.H, shape.N, shape.D)
        inputs = [torch.randn(dims, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]
        names, kernel, reference = ("dq", "dk", "dv"), triton_attention, attention_reference
    else:
        inputs = [
            torch.randn((shape.B, shape.N, shape.D), generator=gen).to(device, dtype).requires_grad_(),
            torch.randn((shape.B, shape.C, shape.D), generator=gen).to(device, dtype).requires_grad_(),
            (1 + 0.1 * torch.randn(shape.C, generator=gen)).to(device).requires_grad_(),
            (0.1 * torch.randn(shape.C, generator=gen)).to(device).requires_grad_(),
        ]
        names = ("d_patches", "d_classes", "d_weight", "d_bias")
        kernel, reference = triton_mask_logits, mask_logits_reference
    out = kernel(*inputs)
    grad_out = torch.randn(out.shape, generator=gen).to(device, dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    ref_out = reference(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, grad_out.float())
    pairs = {"out": (out.detach(), ref_out.detach())}
    pairs.update({n: (g, r) for n, g, r in zip(names, grads, ref_grads)})
    return pairs


# --------------------------------------------------------------------------- GPU timing

def _sdpa_backends() -> list[tuple[str, object]]:
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    return [(n.lower(), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def _attention_impls(q, k, v) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def sdpa(backend):
        def call():
            # The backend is chosen when the forward runs; the backward follows it.
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return call

    impls = {"triton": lambda: triton_attention(q, k, v),
             "reference": lambda: attention_reference(q, k, v)}
    impls.update({f"sdpa_{name}": sdpa(backend) for name, backend in _sdpa_backends()})
    return impls


def _time(fn, inputs, direction: str) -> list[float]:
    """do_bench quantiles (median, p20, p80) in ms of the forward or the backward alone."""
    from triton.testing import do_bench

    if direction == "fwd":
        def bench():
            with torch.no_grad():
                fn()
        return list(do_bench(bench, quantiles=list(QUANTILES)))
    out = fn()
    grad_out = torch.randn_like(out)
    return list(do_bench(
        lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True),
        quantiles=list(QUANTILES),
    ))


def profile_gpu(
    shapes: list[Shape], dtype: torch.dtype, used_by: dict[Shape, list[str]], progress=None
) -> tuple[list[dict], dict]:
    """Time every shape x implementation x direction on cuda:0; returns (rows, device facts)."""
    facts = device_facts()
    facts.update(measured_peak(dtype))
    dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
    elt = torch.finfo(dtype).bits // 8
    progress = progress or sys.stderr
    rows: list[dict] = []
    for i, shape in enumerate(shapes, 1):
        print(f"[{i}/{len(shapes)}] {shape.label}", file=progress, flush=True)
        gen = torch.Generator(device="cuda").manual_seed(0)
        if isinstance(shape, AttnShape):
            dims = (shape.B, shape.H, shape.N, shape.D)
            inputs = [torch.randn(dims, device="cuda", dtype=dtype, generator=gen,
                                  requires_grad=True) for _ in range(3)]
            impls = _attention_impls(*inputs)
            flops = attention_flops
        else:
            inputs = [
                torch.randn((shape.B, shape.N, shape.D), device="cuda", dtype=dtype,
                            generator=gen, requires_grad=True),
                torch.randn((shape.B, shape.C, shape.D), device="cuda", dtype=dtype,
                            generator=gen, requires_grad=True),
                torch.ones(shape.C, device="cuda", requires_grad=True),
                torch.zeros(shape.C, device="cuda", requires_grad=True),
            ]
            impls = {"triton": lambda: triton_mask_logits(*inputs),
                     "reference": lambda: mask_logits_reference(*inputs)}
            flops = mask_flops
        for impl, fn in impls.items():
            for direction in ("fwd", "bwd"):
                ms, status = None, "ok"
                try:
                    ms = _time(fn, inputs, direction)
                except torch.cuda.OutOfMemoryError:
                    status = "out of memory"
                except RuntimeError as e:  # e.g. an SDPA backend that rejects this shape
                    status = "unavailable: " + (str(e).strip().splitlines() or ["?"])[0][:200]
                torch.cuda.empty_cache()
                rows.extend(timing_rows(
                    shape, dtype_name, impl, direction, ms, status,
                    flops(shape, direction), interface_bytes(shape, direction, elt),
                    facts, used_by.get(shape, []),
                ))
        del inputs, impls
        torch.cuda.empty_cache()
    return rows, facts


def timing_rows(shape, dtype_name, impl, direction, ms, status, flops, nbytes, facts, used_by):
    """The rows of one shape x impl x direction: one per statistic of the times ``ms`` (median,
    p20, p80), or one saying why it was not timed (``ms`` None)."""
    base = {
        "kernel": shape.kind, "shape": shape.label, "B": shape.B,
        "H": getattr(shape, "H", ""), "N": shape.N, "C": getattr(shape, "C", ""), "D": shape.D,
        "dtype": dtype_name, "impl": impl, "direction": direction,
        "device": facts.get("gpu_name", ""), "used_by": "; ".join(used_by),
    }
    if ms is None:
        # Not timed: one row that says why, and no numbers.
        return [{**base, "stat": "median", "ms": None, "tflops": None, "gbps": None,
                 "frac_peak": None, "frac_peak_gbps": None, "status": status}]
    rows = []
    for stat, t in zip(STATS, ms):
        tflops = flops / (t * 1e-3) / 1e12
        gb_s = nbytes / (t * 1e-3) / 1e9
        rows.append({
            **base, "stat": stat, "ms": t, "tflops": tflops, "gbps": gb_s,
            "frac_peak": tflops / facts["peak_matmul_tflops"],
            "frac_peak_gbps": gb_s / facts["peak_copy_gb_s"], "status": status,
        })
    return rows


# --------------------------------------------------------------------------- output

def csv_text(rows: list[dict]) -> str:
    """The rows as CSV, columns in the rows' own order."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _json_safe(rows: list[dict]) -> list[dict]:
    # JSON has no NaN; a NaN error (a broken kernel) becomes null.
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in rows]


def format_table(rows: list[dict], kind: str) -> str:
    """A plain-text table: the check's rows, or the medians of the timing rows."""
    if kind == "check":
        header = ("shape", "dtype", "output", "max_abs_err", "limit", "result")
        body = [(r["shape"], r["dtype"], r["output"], f"{r['max_abs_err']:.3e}",
                 f"{r['limit']:.1e}", "pass" if r["passed"] else "FAIL") for r in rows]
    else:
        header = ("shape", "impl", "dir", "ms", "TFLOP/s", "GB/s", "%peak flops", "status")
        body = [
            (r["shape"], r["impl"], r["direction"],
             *(("-",) * 4 if r["ms"] is None else
               (f"{r['ms']:.4f}", f"{r['tflops']:.2f}", f"{r['gbps']:.1f}",
                f"{100 * r['frac_peak']:.1f}")),
             r["status"])
            for r in rows if r["stat"] == "median"
        ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
