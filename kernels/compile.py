"""`segrepro kernels compile`: compile every kernel ahead of time and report its resources.

Every autotune config of every Triton kernel is compiled with ``triton.compile`` for each
named GPU architecture (a ``GPUTarget``; no GPU needed) and each input dtype, with the
arguments the launcher passes on a zoo shape (so the specialisation — 16-byte alignment,
unit strides — is the one a real launch gets). Per kernel, config, dtype and target it reports
registers per thread, spilled bytes per thread and shared memory per program: the static half
of profiling kernels for a GPU the user may not have.

- registers and spill bytes: ``cuobjdump --dump-resource-usage`` of the cubin (Triton ships
  cuobjdump beside ptxas); spill bytes are the per-thread stack frame, where ptxas puts what
  does not fit in registers (these kernels have no local arrays, so a non-zero frame is a spill).
- shared memory: Triton's own figure for the compiled kernel (its shared memory is dynamic, so
  cuobjdump shows 0).

fp32 compiles with the tl.dot precision the kernels use in this process (IEEE under torch's
default float32 matmul precision "highest", TF32 otherwise; kernels/_runtime.dot_precision).
The mask step's vector-gradient kernel is compiled in its patch-side launch; the class-side
launch reads dm transposed through its strides, with the same tiles.

Triton decides at import time whether @triton.jit compiles or interprets, and a CPU process
of this project interprets (kernels/__init__.py). The compilation therefore runs in worker
processes started with TRITON_INTERPRET=0, in parallel; Triton's on-disk cache makes a repeated
run fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

DTYPES = ("fp32", "fp16", "bf16")
DEFAULT_TARGETS = ("sm_80", "sm_90")
# The modules holding kernels, each with a compile_launches(dtype) listing its kernel launches.
_MODULES = ("kernels.attention", "kernels.mask_decoder")


class CompileError(ValueError):
    """A `kernels compile` request that cannot run; the message names the option and value."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One kernel (its module, its place in the module's compile_launches()), dtype and target;
    compiles every autotune config the kernel has for that dtype."""
    module: str
    index: int
    dtype: str
    arch: int


def parse_targets(spec: str) -> list[int]:
    """"sm_80,sm_90" (or "80,sm90") -> [80, 90]."""
    archs = []
    for token in (t.strip() for t in spec.split(",")):
        m = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", token.lower())
        if not m:
            raise CompileError(f"--target: {token!r} is not a CUDA architecture such as sm_80 or sm_90")
        arch = int(m.group(1))
        if arch < 75:
            raise CompileError(f"--target: {token} is older than sm_75, which Triton 3 does not support")
        if arch not in archs:
            archs.append(arch)
    return archs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `segrepro kernels compile`."""
    parser.add_argument("--target", default=",".join(DEFAULT_TARGETS),
                        help="CUDA architectures, comma-separated (default: sm_80,sm_90)")
    parser.add_argument("--dtype", default=",".join(DTYPES),
                        help="input dtypes, comma-separated among fp32,fp16,bf16 (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: one per CPU)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(args: argparse.Namespace) -> int:
    """The command: compile, print the table (or JSON); exit 1 when a rule in ``problems`` fails."""
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise CompileError(f"--dtype: {','.join(bad) or args.dtype!r} is not among {','.join(DTYPES)}")
    if args.jobs < 1:
        raise CompileError(f"--jobs: {args.jobs} must be >= 1")
    rows = compile_all(parse_targets(args.target), dtypes, jobs=args.jobs, progress=sys.stderr)
    issues = problems(rows)
    if args.json:
        print(json.dumps({"rows": rows, "problems": issues}, indent=2))
    else:
        print(format_table(rows))
        print(summary(rows))
        for line in issues:
            print(f"problem: {line}")
    return 1 if issues else 0


def compile_all(archs: list[int], dtypes: list[str], jobs: int = 1, progress=None) -> list[dict]:
    """Compile every kernel x config x dtype x target in ``jobs`` worker processes; rows sorted."""
    import importlib

    import torch

    work = [Job(module, index, dtype, arch) for module in _MODULES
            for index in range(len(importlib.import_module(module).compile_launches(torch.float32)))
            for dtype in dtypes for arch in archs]
    shards = [work[i::jobs] for i in range(min(jobs, len(work)))]
    if progress is not None:
        print(f"compiling {len(work)} kernel x dtype x target combinations (each in all its configs) "
              f"in {len(shards)} processes", file=progress, flush=True)
    with ThreadPoolExecutor(len(shards)) as pool:
        results = list(pool.map(_run_worker, shards))
    rows = [row for shard in results for row in shard]
    return sorted(rows, key=lambda r: (r["kernel"], r["target"], DTYPES.index(r["dtype"]), r["config_index"]))


def _run_worker(shard: list[Job]) -> list[dict]:
    return json.loads(_worker_process(json.dumps([dataclasses.astuple(j) for j in shard])))


def _worker_process(stdin: str) -> str:
    # The workers import this very copy of the package, whatever the installed one is.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile", "--worker"], input=stdin,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"kernels compile worker failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


# --------------------------------------------------------------------------- worker side

def _launches(module: str, dtype: str):
    import importlib

    import torch

    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    return importlib.import_module(module).compile_launches(dt)


def _configs(kernel, jit, args) -> list:
    """The configs the kernel's autotuner would try for these arguments (its early prune keeps
    those of the input dtype); a plain @triton.jit kernel launches with Triton's defaults."""
    import triton

    configs = getattr(kernel, "configs", None) or [triton.Config({}, num_warps=4, num_stages=3)]
    prune = getattr(kernel, "early_config_prune", None)
    return prune(configs, dict(zip(jit.arg_names, args))) if prune else configs


def _jit(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):  # through @triton.autotune / @triton.heuristics
        kernel = kernel.fn
    return kernel


def compile_kernel(job: Job, launches) -> list[dict]:
    """Compile one kernel in each of its configs for one dtype and target; one row per config."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, args, meta = launches[job.index]
    jit = _jit(kernel)
    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    rows = []
    for index, config in enumerate(_configs(kernel, jit, args)):
        kwargs = {**meta, **config.all_kwargs()}
        # The JIT's own binder and packing: the same signature, constants and alignment
        # attributes a launch with these arguments compiles with.
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        usage = resource_usage(compiled.asm["cubin"])
        rows.append({
            "kernel": jit.__name__.strip("_").removesuffix("_kernel"),
            "config": ",".join([*(f"{k}={v}" for k, v in config.kwargs.items()),
                                f"w{config.num_warps}", f"s{config.num_stages}"]),
            "config_index": index, "dtype": job.dtype, "target": f"sm_{job.arch}",
            "registers": usage["REG"], "spill_bytes": usage["STACK"] + usage["LOCAL"],
            "shared_bytes": compiled.metadata.shared,
        })
    return rows


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, LOCAL, SHARED of the one function in a cubin, from cuobjdump."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                              capture_output=True, text=True, check=True).stdout
    # e.g. " Function _attn_fwd_kernel:\n  REG:152 STACK:0 SHARED:0 LOCAL:0 ..."
    match = re.search(r"Function [^:]+:\s*\n\s*(.*)", text)
    if not match:
        raise RuntimeError(f"cuobjdump printed no function resource usage:\n{text}")
    fields = dict(re.findall(r"(\w+):(\d+)", match.group(1)))
    return {k: int(fields.get(k, 0)) for k in ("REG", "STACK", "LOCAL", "SHARED")}


def _worker_main() -> None:
    rows, cache = [], {}
    for job in (Job(*j) for j in json.loads(sys.stdin.read())):
        key = (job.module, job.dtype)
        if key not in cache:
            cache[key] = _launches(job.module, job.dtype)
        rows += compile_kernel(job, cache[key])
    print(json.dumps(rows))


# --------------------------------------------------------------------------- checks and output

def problems(rows: list[dict]) -> list[str]:
    """What the kernels promise: no fp16/bf16 config spills, and every fp32 kernel has at least
    one config that does not (fp32 tiles are twice the size; its autotuner may skip the rest)."""
    issues = [f"{r['kernel']} [{r['config']}] {r['dtype']} {r['target']} spills {r['spill_bytes']} bytes"
              for r in rows if r["dtype"] != "fp32" and r["spill_bytes"]]
    fp32 = {}
    for r in rows:
        if r["dtype"] == "fp32":
            fp32.setdefault((r["kernel"], r["target"]), []).append(r["spill_bytes"])
    issues += [f"{k} fp32 {t}: every config spills" for (k, t), s in sorted(fp32.items()) if min(s) > 0]
    return issues


def summary(rows: list[dict]) -> str:
    """Spilling configs per kernel x target x dtype, e.g. "mask_fwd sm_80 fp16: 0/4 spill"."""
    groups: dict[tuple, list[int]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["target"], r["dtype"]), []).append(r["spill_bytes"])
    lines = ["spilling configs per kernel, target and dtype:"]
    for (kernel, target, dtype), spills in groups.items():
        bad = [s for s in spills if s]
        detail = f" ({min(bad)}-{max(bad)} bytes)" if bad else ""
        lines.append(f"  {kernel:18s} {target}  {dtype}  {len(bad)}/{len(spills)} spill{detail}")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    header = ("kernel", "config", "dtype", "target", "regs", "spill B", "shared B")
    body = [(r["kernel"], r["config"], r["dtype"], r["target"], str(r["registers"]),
             str(r["spill_bytes"]), str(r["shared_bytes"])) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    if "--worker" not in sys.argv:
        raise SystemExit("run `segrepro kernels compile`; this module's own entry is its worker")
    _worker_main()
