"""``segrepro report``: MLflow runs plus the documented table -> report.md, report.html,
results.csv (the long table) and plots/*.png in one output directory.

The files are written into a temporary directory beside the output directory, which then
replaces it as a whole (``harness.atomic.atomic_dir``): a reader never sees a report half
old and half new, and a failed report leaves the previous one in place."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import pandas as pd

from harness.atomic import atomic_dir
from harness.contract import EXPERIMENT, default_tracking_uri
from reports import plots, render, tables
from reports.collect import ReportError, collect

TITLE = "segrepro: Segmenter ADE20K, documented vs reproduced"
OUTPUTS = {"markdown": "report.md", "html": "report.html", "csv": "results.csv"}
PLOTS_DIR = "plots"
REPORT_NAMES = {*OUTPUTS.values(), PLOTS_DIR}  # all an output directory may hold


def _records(df: pd.DataFrame) -> list[dict]:
    # Through pandas' JSON writer so NaN becomes null and timestamps become text; with the most
    # decimals it writes (its default of 10 keeps only 4 digits of a kernel's 3.6e-7 error).
    return json.loads(df.to_json(orient="records", date_format="iso", double_precision=15))


def build_report(tracking_uri: str, out: str | Path, tolerance: float = tables.TOLERANCE,
                 experiment_name: str = EXPERIMENT) -> dict:
    """Read the store, write every output into ``out`` (replacing it as a whole), return the
    views as plain data."""
    out = Path(out).resolve()
    # the swap replaces the whole directory: never one that holds anything but a report
    if out.exists() and (not out.is_dir() or any(p.name not in REPORT_NAMES for p in out.iterdir())):
        raise ReportError(f"{out} holds files that are not a report's; the report replaces its output directory as "
                          f"a whole: give a new or empty one with --out")
    c = collect(tracking_uri, experiment_name)
    miou = tables.miou_view(c, tolerance)
    throughput = tables.throughput_view(c)
    kernels = tables.kernels_view(c)
    curves = tables.curves_view(c)
    check = tables.kernel_check_view(c)
    stat = tables.kernel_stat(c)
    shown = set(curves["run_id"])
    kernel_run = c.kernels["run_id"].iloc[0] if not c.kernels.empty else None
    check_run = c.kernel_check["run_id"].iloc[0] if not c.kernel_check.empty else None
    bench_protocols = tables.documented_bench_protocols(c)

    sections = [
        render.Section(
            "mIoU: documented vs reproduced",
            f"Newest run per configuration and profile. Δ = segrepro − the documented figure named in "
            f"'vs' (the source the run's recipe follows, else the reference implementation, else "
            f"PaddleViT). Verdict: reproduced when |Δ| ≤ {tolerance:g} mIoU (the documented run-to-run "
            f"spread), else below or above; smoke-profile runs get no verdict.",
            miou, image=plots.miou_plot(miou), image_name="miou"),
        render.Section(
            "Released checkpoints",
            "Each checkpoint evaluated with `segrepro eval` (reference run directories, MMSeg and PaddleViT "
            "checkpoints, segrepro's own): its source's documented figure for its configuration, its mIoU under "
            "its source's own protocol and under each protocol it was evaluated with (newest run each). "
            "'protocol (own)' lists the own protocol's rules as logged.",
            tables.released_view(c), empty_text="No checkpoint evaluated with segrepro eval --run-dir."),
        render.Section("Provenance of each run",
                       "The ImageNet weights the encoder started from (timm tag and the file's SHA-256, or random "
                       "init), the training precision, and window, stride and scales, as logged by each run.",
                       tables.protocols_view(c), empty_text="No runs."),
        render.Section("Documented sources", "Where each documented figure comes from and its protocol.",
                       tables.sources_view()),
        render.Section(
            "Throughput",
            "Reproduced: the run's benchmark (device, batch, precision, image size in 'protocol'). "
            "Documented: " + "; ".join(f"{k}: {v}" for k, v in bench_protocols.items()) + ".",
            throughput, empty_text="No run logged a benchmark."),
        render.Section(
            "Kernels",
            (f"Kernels profile run {kernel_run[:8]}, statistic {stat or 'as logged'}: TFLOP/s and fraction "
             f"of the device's peak per shape." if kernel_run else "TFLOP/s and fraction of peak per shape."),
            kernels, empty_text="No kernels profile logged (segrepro kernels profile times the kernels on a GPU).",
            image=plots.kernels_plot(c.kernels, stat), image_name="kernels"),
        render.Section(
            "Kernel correctness (Triton interpreter)",
            (f"Kernels check run {check_run[:8]}: " if check_run else "")
            + "without a GPU, segrepro kernels profile runs the Triton source under the interpreter and compares "
              "its output and every gradient with the PyTorch reference (fp32, on the same inputs); nothing is timed.",
            check, empty_text="No kernels check logged."),
        render.Section("Training curves", "Loss, learning rate and val mIoU against iteration, per shown run.",
                       curves, empty_text="No training curves logged.",
                       image=plots.curves_plot(c.curves[c.curves["run_id"].isin(shown)]), image_name="curves"),
    ]
    header = [f"tracking URI: {tracking_uri}",
              f"generated: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
              f"configuration runs in the store: {len(c.runs)} (all of them in results.csv)",
              f"tolerance: {tolerance:g} mIoU"]

    with atomic_dir(out) as tmp:
        for s in sections:
            if s.image is not None:
                (tmp / PLOTS_DIR).mkdir(exist_ok=True)
                (tmp / PLOTS_DIR / f"{s.image_name}.png").write_bytes(s.image)
        (tmp / OUTPUTS["csv"]).write_text(c.long.to_csv(index=False))
        (tmp / OUTPUTS["markdown"]).write_text(render.markdown(TITLE, header, sections, c.notes))
        (tmp / OUTPUTS["html"]).write_text(render.html_page(TITLE, header, sections, c.notes))
    files = {k: out / name for k, name in OUTPUTS.items()}
    return {"tracking_uri": tracking_uri, "tolerance": tolerance,
            "outputs": {k: str(v) for k, v in files.items()},
            "tables": [s.title for s in sections if not s.table.empty],
            "images": [s.image_name for s in sections if s.image is not None],
            "miou": _records(miou), "throughput": _records(throughput), "kernels": _records(kernels),
            "kernel_check": _records(check), "curves": _records(curves),
            "released": _records(tables.released_view(c)), "notes": c.notes}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///RUN_DIR/mlflow.db)")
    parser.add_argument("--run-dir", default="runs/reproduce", help="run directory holding mlflow.db (default: segrepro "
                        "reproduce's, runs/reproduce)")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/report)")
    parser.add_argument("--tolerance", type=float, default=tables.TOLERANCE,
                        help=f"|reproduced − documented| counted as reproduced, in mIoU (default {tables.TOLERANCE})")
    parser.add_argument("--json", action="store_true", help="print the tables as JSON")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if args.tracking_uri is None and not run_dir.is_dir():
        print(f"segrepro report: error: run directory {run_dir} does not exist (give --run-dir or --tracking-uri)",
              file=sys.stderr)
        return 2
    uri = args.tracking_uri or default_tracking_uri(run_dir)
    out = Path(args.out) if args.out else run_dir / "report"
    try:
        result = build_report(uri, out, args.tolerance)
    except ReportError as e:
        print(f"segrepro report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"segrepro report: error: cannot write the report to {out}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for name, _, _ in tables.EVALS:
        counts = pd.Series([r[f"verdict {name}"] for r in result["miou"]]).value_counts()
        print(f"{name}: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    for note in result["notes"]:
        print(f"note: {note}")
    print("wrote " + ", ".join(result["outputs"].values()))
    return 0
