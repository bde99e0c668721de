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
from harness.contract import DEFAULT_RUN_DIR, EXPERIMENT, default_tracking_uri
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
    groups = tables.summary(miou)
    throughput = tables.throughput_view(c)
    training = tables.train_bench_view(c)
    kernels = tables.kernels_view(c)
    curves = tables.curves_view(c)
    check = tables.kernel_check_view(c)
    data = tables.data_view(c)
    stat = tables.kernel_stat(c)
    shown = set(curves["run_id"])
    kernel_run = c.kernels["run_id"].iloc[0] if not c.kernels.empty else None
    check_run = c.kernel_check["run_id"].iloc[0] if not c.kernel_check.empty else None
    bench_protocols = tables.documented_bench_protocols(c)
    verdict_rule = (f"Δ = segrepro − the documented figure named in 'vs' (the source the run's recipe follows, else "
                    f"the reference implementation, else PaddleViT). Verdict: reproduced when |Δ| ≤ {tolerance:g} "
                    f"mIoU (the documented run-to-run spread), else below or above; given only for a run on the "
                    f"official ADE20K validation split, verified, at its recipe's full protocol (whatever its profile "
                    f"is called): other runs show their figure with 'no verdict' and why (see 'Runs').")

    sections = [
        render.Section(
            "Summary",
            "Per evaluation: the configurations reproduced within the tolerance, below, above, without a verdict "
            "(and why), failed or stopped, and not run. " + verdict_rule,
            tables.summary_view(groups, tolerance)),
        render.Section("Data", "What each shown run read: its root, what its validation split is and why, image "
                       "counts and the split's fingerprint.", data, empty_text="No runs."),
        render.Section("mIoU single-scale: documented vs reproduced",
                       "Newest run per configuration and profile; 'data' names what segrepro's figure was measured "
                       "on (documented figures are ADE20K val). Verdicts as in the summary.",
                       tables.miou_eval_view(miou, "ss")),
        render.Section("mIoU multi-scale + flip: documented vs reproduced",
                       "As above, for the multi-scale + flip evaluation. The plot labels each configuration with the "
                       "data its segrepro bars were measured on.",
                       tables.miou_eval_view(miou, "ms+flip"), image=plots.miou_plot(miou), image_name="miou"),
        render.Section(
            "Released checkpoints",
            "Each checkpoint evaluated with `segrepro eval` (reference run directories, MMSeg and PaddleViT "
            "checkpoints, segrepro's own): its source's documented figure for its configuration, its mIoU under "
            "its source's own protocol and under each protocol it was evaluated with (newest run each), and the data "
            "it was evaluated on. 'protocol (own)' lists the own protocol's rules as logged.",
            tables.released_view(c), empty_text="No checkpoint evaluated with segrepro eval --run-dir."),
        render.Section("Runs: status, data and provenance",
                       "Each shown run's status, its data, how its logged settings differ from its recipe's full "
                       "protocol (the first few differences), the ImageNet weights the encoder started from (timm tag "
                       "and the file's SHA-256, or random init), the training precision, and window, stride and "
                       "scales, as logged by each run.",
                       tables.protocols_view(c), empty_text="No runs."),
        render.Section("Documented sources", "Where each documented figure comes from and its protocol.",
                       tables.sources_view()),
        render.Section(
            "Inference speed",
            "segrepro bench (inference) of each shown run, with the device, precision, batch and image size it ran "
            "at. MMSeg's fps is set in the same row only when measured alike (a GPU, its batch and precision, the "
            "configuration's full image size); otherwise 'vs MMSeg fps' says what differs. The reference's fps "
            "states no GPU or protocol and is listed under 'Documented speed, size and memory' only. 'inference "
            "peak MB' is the memory of inference, not of training.",
            throughput, empty_text="No run logged an inference benchmark."),
        render.Section(
            "Training speed and memory",
            "segrepro bench --mode train of each shown run, with the device, precision, batch and crop it ran at. "
            "Its peak memory (MiB / 1024) is set beside MMSeg's documented training memory only when measured alike "
            f"(MMSeg: {bench_protocols['MMSeg train memory GB']}, at the configuration's full crop, on a GPU).",
            training, empty_text="No run logged a training benchmark (segrepro bench --mode train)."),
        render.Section(
            "Documented speed, size and memory",
            "Each under its own protocol: " + "; ".join(f"{k}: {v}" for k, v in bench_protocols.items()) + ".",
            tables.documented_speed_view(c)),
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
    header += [f"data: {r['data']} at {r['root']} ({r['validation images']} validation images): {r['runs']}"
               for r in data.to_dict("records")] or ["data: no runs, documented figures only"]

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
            "summary": groups, "data": _records(data),
            "miou": _records(miou), "throughput": _records(throughput), "training_benchmark": _records(training),
            "kernels": _records(kernels),
            "kernel_check": _records(check), "curves": _records(curves),
            "released": _records(tables.released_view(c)),
            "documented_speed": _records(tables.documented_speed_view(c)),
            "notes": c.notes}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///RUN_DIR/mlflow.db)")
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="run directory holding mlflow.db "
                        f"(default: segrepro reproduce's, {DEFAULT_RUN_DIR})")
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
    for name, groups in result["summary"].items():
        print(f"{name}: " + ", ".join(f"{len(configs)} {outcome}" for outcome, configs in groups.items()))
    for row in result["data"]:
        print(f"data: {row['data']} at {row['root']}: {row['runs']}")
    for note in result["notes"]:
        print(f"note: {note}")
    print("wrote " + ", ".join(result["outputs"].values()))
    return 0
