"""The report's views, each built from the long table and the runs of a ``Collected``.

Which run a view shows: the newest run of each (configuration, profile); older runs stay in
results.csv. Which documented figure a reproduced mIoU is compared with (the baseline): the
figure of the source the run's recipe follows (recipes are named after the sources), else the
reference implementation's, else PaddleViT's. The zoo YAMLs are the reference recipe, so for
a default run this is the reference figure; the view names the baseline in its "vs" columns.
Whether a run gets a verdict at all: only on the verified ADE20K validation split at its recipe's
full protocol (``no_verdict_reason``). Speed and memory sit beside a documented figure only when
measured alike (``like_for_like``).
"""
from __future__ import annotations

import re

import pandas as pd

from harness import contract
from harness.config import documented_sources, zoo_names
from reports.collect import DATA_LABEL, SOURCE, Collected, full_protocol

# The documented run-to-run spread of ADE20K mIoU (reference/segmenter.md §1). A protocol
# choice of this report, not a documented figure: callers may pass another tolerance.
TOLERANCE = 0.5
BASELINE_ORDER = ("reference", "paddlevit")
SOURCE_LABEL = {"paddlevit": "PaddleViT", "reference": "reference", "mmseg": "MMSeg", SOURCE: "segrepro"}
# (column name, documented metric, MLflow metric) of the two evaluations
EVALS = (("ss", "miou_ss", contract.SS_MIOU), ("ms+flip", "miou_msflip", contract.MSFLIP_MIOU))
DOCUMENTED_MIOU = [("paddlevit", "miou_ss"), ("reference", "miou_ss"), ("reference", "miou_msflip"),
                   ("mmseg", "miou_ss"), ("mmseg", "miou_msflip")]


def miou_label(source: str, metric: str) -> str:
    return f"{SOURCE_LABEL[source]} {'ss' if metric == 'miou_ss' else 'ms+flip'}"


def documented(c: Collected) -> dict[tuple[str, str, str], float]:
    """(config, source, metric) -> documented value."""
    doc = c.long[c.long["source"] != SOURCE]
    return {(r.config, r.source, r.metric): r.value for r in doc.itertuples()}


def latest_runs(c: Collected) -> pd.DataFrame:
    if c.runs.empty:
        return c.runs
    return c.runs.sort_values("start_time", kind="stable").groupby(["config", "profile"]).tail(1)


def _config_order(c: Collected) -> list[str]:
    """Zoo configurations first, then documented-only rows, then runs of other configs."""
    zoo = zoo_names()
    doc = sorted(set(c.long.loc[c.long["source"] != SOURCE, "config"]) - set(zoo))
    rest = sorted(set(c.runs["config"]) - set(zoo) - set(doc)) if not c.runs.empty else []
    return zoo + doc + rest


def _profile_key(profile: pd.Series) -> pd.Series:
    return profile.map({"full": 0, "smoke": 1}).fillna(2)


def shown_runs(c: Collected) -> pd.DataFrame:
    """The newest run per (config, profile), in report order (config, then full before smoke)."""
    runs = latest_runs(c)
    if runs.empty:
        return runs
    order = {name: i for i, name in enumerate(_config_order(c))}
    return runs.sort_values(["config", "profile"], key=lambda s: s.map(order) if s.name == "config"
                            else _profile_key(s), kind="stable").reset_index(drop=True)


def verdict(diff: float, tolerance: float = TOLERANCE) -> str:
    # A hair of slack so a difference of exactly the tolerance, after float rounding, counts.
    if abs(diff) <= tolerance + 1e-9:
        return "reproduced"
    return "below" if diff < 0 else "above"


NO_VERDICT_DATA = {contract.VAL_GENERATED: "generated data", contract.VAL_UNVERIFIED: "data unverified",
                   contract.VAL_OTHER: "not ADE20K val", "": "data not recorded"}


def no_verdict_reason(run: pd.Series) -> str | None:
    """Why a finished run's figures are not judged against a documented ADE20K figure, or None:
    a verdict needs the official validation split, verified (contract.VAL_ADE20K), and the
    recipe's full protocol (collect.protocol_gaps), whatever the profile is called."""
    if run["val_data"] != contract.VAL_ADE20K:
        return NO_VERDICT_DATA.get(run["val_data"], run["val_data"])
    if run["protocol_gaps"]:
        return "not the full protocol"
    return None


def _run_state(run: pd.Series | None, is_zoo: bool) -> tuple[str, str | None]:
    """(status text, verdict that overrides the numbers or None)."""
    if run is None:
        return ("not run", "not run") if is_zoo else ("no configuration", "no configuration")
    if run["status"] == "failed":
        error = (run["error"] or "no error recorded").strip().splitlines()[0]
        error = error if len(error) <= 120 else error[:117] + "..."
        return f"failed: {error}", "failed"
    if run["status"] != "finished":
        return run["status"], run["status"]
    reason = no_verdict_reason(run)
    return "finished", (f"no verdict ({reason})" if reason else None)


def miou_view(c: Collected, tolerance: float = TOLERANCE) -> pd.DataFrame:
    """One row per configuration and shown run: documented mIoU of every source beside the
    reproduced ss and ms+flip, the difference to the baseline and a verdict."""
    doc = documented(c)
    runs = shown_runs(c)
    zoo = set(zoo_names())
    rows = []
    for config in _config_order(c):
        mine = runs[runs["config"] == config] if not runs.empty else runs
        for run in [r for _, r in mine.iterrows()] or [None]:
            status, override = _run_state(run, config in zoo)
            row = {"config": config, "profile": "" if run is None else run["profile"],
                   "recipe": "" if run is None else run["recipe"], "data": "" if run is None else run["data"]}
            row.update({miou_label(s, m): doc.get((config, s, m)) for s, m in DOCUMENTED_MIOU})
            for name, metric, mlflow_name in EVALS:
                value = None if run is None else run.get(f"metrics.{mlflow_name}")
                value = None if value is None or pd.isna(value) else float(value)
                order = ([run["recipe"]] if run is not None and run["recipe"] else []) + list(BASELINE_ORDER)
                base = next((s for s in order if (config, s, metric) in doc), None)
                diff = None
                if override:
                    text = override
                elif value is None:
                    text = "no result"
                elif base is None:
                    text = "no documented figure"
                else:  # a difference is shown only where a verdict is given
                    diff = value - doc[(config, base, metric)]
                    text = verdict(diff, tolerance)
                row.update({f"segrepro {name}": value, f"vs {name}": SOURCE_LABEL.get(base, base) if base else "",
                            f"Δ {name}": diff, f"verdict {name}": text})
            row.update({"status": status, "run_id": "" if run is None else run["run_id"]})
            rows.append(row)
    cols = (["config", "profile", "recipe", "data"] + [miou_label(s, m) for s, m in DOCUMENTED_MIOU]
            + [f"segrepro {n}" for n, _, _ in EVALS] + [f"{k} {n}" for n, _, _ in EVALS for k in ("vs", "Δ")]
            + [f"verdict {n}" for n, _, _ in EVALS] + ["status", "run_id"])
    return pd.DataFrame(rows, columns=cols)


def miou_eval_view(miou: pd.DataFrame, name: str) -> pd.DataFrame:
    """The columns of one evaluation (ss or ms+flip) of ``miou_view``: narrow enough to read."""
    documented_cols = [miou_label(s, m) for s, m in DOCUMENTED_MIOU if miou_label(s, m).endswith(f" {name}")]
    return miou[["config", "profile", "data", *documented_cols, f"segrepro {name}", f"vs {name}", f"Δ {name}",
                 f"verdict {name}", "run_id"]]


SUMMARY_ORDER = ("reproduced", "below", "above", "no verdict", "failed, stopped or running", "not run")


def summary(miou: pd.DataFrame) -> dict[str, dict[str, list[str]]]:
    """Per evaluation (ss, ms+flip): which configurations were reproduced within the tolerance,
    came out below or above, got no verdict (and why), failed or were not run. Documented rows
    without a configuration are left out."""
    out = {}
    for name, _, _ in EVALS:
        groups: dict[str, list[str]] = {k: [] for k in SUMMARY_ORDER}
        for row in miou.to_dict("records"):
            verdict_text = row[f"verdict {name}"]
            label = row["config"] + (f" [{row['profile']}]" if row["profile"] not in ("", "full") else "")
            if verdict_text == "no configuration":
                continue
            if verdict_text in ("reproduced", "below", "above", "not run"):
                groups[verdict_text].append(label)
            elif verdict_text.startswith("no verdict ("):
                groups["no verdict"].append(f"{label} ({verdict_text[len('no verdict ('):-1]})")
            elif verdict_text in ("no result", "no documented figure"):
                groups["no verdict"].append(f"{label} ({verdict_text})")
            else:
                groups["failed, stopped or running"].append(f"{label} ({verdict_text})")
        out[name] = groups
    return out


def summary_view(groups: dict[str, dict[str, list[str]]], tolerance: float = TOLERANCE) -> pd.DataFrame:
    """The summary as a table: one row per outcome, one column per evaluation, "N: names"."""
    label = {"reproduced": f"reproduced (Δ within ±{tolerance:g})"}
    rows = [{"outcome": label.get(k, k),
             **{name: f"{len(g[k])}" + (f": {', '.join(g[k])}" if g[k] else "") for name, g in groups.items()}}
            for k in SUMMARY_ORDER]
    return pd.DataFrame(rows, columns=["outcome", *groups])


def data_view(c: Collected) -> pd.DataFrame:
    """The data the shown runs read: one row per (root, validation split), what it is and why."""
    runs = shown_runs(c)
    cols = ["data", "root", "validation images", "training images", "val fingerprint", "why", "runs"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (root, fingerprint), g in runs.groupby(["data_root", "val_fingerprint"], sort=False):
        first = g.iloc[0]
        rows.append({"data": DATA_LABEL.get(first["val_data"], first["val_data"]), "root": root or "not recorded",
                     "validation images": first["val_images"], "training images": first["train_images"],
                     "val fingerprint": fingerprint, "why": first["val_data_note"],
                     "runs": ", ".join(g["config"] + g["profile"].map(lambda p: "" if p == "full" else f" [{p}]"))})
    return pd.DataFrame(rows, columns=cols)


BENCH_COLUMNS = [(contract.BENCH_IMAGES_PER_S, "images/s"), (contract.BENCH_LATENCY_MEDIAN_MS, "latency median ms"),
                 (contract.BENCH_GFLOPS, "GFLOPs"), (contract.BENCH_PARAMS_M, "params M"),
                 (contract.BENCH_PEAK_MEMORY_MB, "inference peak MB")]
TRAIN_BENCH_COLUMNS = [(contract.metric(contract.BENCH_TRAIN, "images_per_s"), "images/s"),
                       (contract.metric(contract.BENCH_TRAIN, "step_median_ms"), "step median ms"),
                       (contract.metric(contract.BENCH_TRAIN, "step_p90_ms"), "step p90 ms")]
TRAIN_PEAK = contract.metric(contract.BENCH_TRAIN, "peak_memory_mb")
DOCUMENTED_BENCH = [("reference", "fps", "reference fps"), ("mmseg", "fps", "MMSeg fps"),
                    ("reference", "params", "reference params M"), ("mmseg", "train_memory", "MMSeg train memory GB")]
SETTINGS = ["device", "precision", "batch"]


def _documented_protocol(c: Collected, source: str, metric: str) -> str:
    doc = c.long[(c.long["source"] == source) & (c.long["metric"] == metric)]
    return "; ".join(doc["protocol"].dropna().unique())


def like_for_like(settings: dict, size: str, full_size: str | None, documented_protocol: str) -> str:
    """"" when a measurement was taken as the documented figure was (read from that figure's
    protocol text in experiments/documented.yaml: a GPU, its batch, its precision where it names
    one, at the configuration's full image or crop size), else what differs. A documented figure
    that states no batch is comparable with nothing."""
    batch = re.search(r"\bbatch (\d+)", documented_protocol)
    if not batch:
        return f"documented: {documented_protocol or 'no protocol'}"
    precision = re.search(r"\b(fp32|fp16|bf16)\b", documented_protocol)
    gaps = []
    if not settings["gpu"]:
        gaps.append(settings["device"] or "device not logged")
    if settings["batch"] != batch.group(1):
        gaps.append(f"batch {settings['batch'] or '?'} (documented {batch.group(1)})")
    if precision and settings["precision"] != precision.group(1):
        gaps.append(f"{settings['precision'] or '?'} (documented {precision.group(1)})")
    if full_size is not None and size != full_size:
        gaps.append(f"size {size or '?'} (full {full_size})")
    return ", ".join(gaps)


def _full(run: pd.Series, key: str) -> str | None:
    full = full_protocol(run["config"], run["recipe"])
    return None if full is None else full.get(key)


def throughput_view(c: Collected) -> pd.DataFrame:
    """Inference speed of every shown run that logged a benchmark, with its device, precision,
    batch and image size; MMSeg's fps in the same row only when measured alike (like_for_like),
    the parameter count beside the reference's (a count does not depend on the device)."""
    doc = documented(c)
    protocol = _documented_protocol(c, "mmseg", "fps")
    rows = []
    for _, run in shown_runs(c).iterrows():
        values = {label: run.get(f"metrics.{key}") for key, label in BENCH_COLUMNS}
        if all(v is None or pd.isna(v) for v in values.values()):
            continue
        b = run["bench"]
        gap = like_for_like(b, b["size"], _full(run, "eval.window"), protocol)
        rows.append({"config": run["config"], "profile": run["profile"], **{k: b[k] for k in SETTINGS},
                     "image": b["size"], **values,
                     "reference params M": doc.get((run["config"], "reference", "params")),
                     "MMSeg fps": None if gap else doc.get((run["config"], "mmseg", "fps")),
                     "vs MMSeg fps": f"not comparable: {gap}" if gap else "same protocol", "run_id": run["run_id"]})
    cols = (["config", "profile", *SETTINGS, "image"] + [label for _, label in BENCH_COLUMNS]
            + ["reference params M", "MMSeg fps", "vs MMSeg fps", "run_id"])
    return pd.DataFrame(rows, columns=cols).astype({label: float for _, label in BENCH_COLUMNS})


def train_bench_view(c: Collected) -> pd.DataFrame:
    """Training speed and peak memory (segrepro bench --mode train) with device, precision, batch
    and crop; MMSeg's documented training memory beside it only when measured alike."""
    doc = documented(c)
    protocol = _documented_protocol(c, "mmseg", "train_memory")
    rows = []
    for _, run in shown_runs(c).iterrows():
        peak = run.get(f"metrics.{TRAIN_PEAK}")
        values = {label: run.get(f"metrics.{key}") for key, label in TRAIN_BENCH_COLUMNS}
        if all(v is None or pd.isna(v) for v in [peak, *values.values()]):
            continue
        b = run["bench_train"]
        gap = like_for_like(b, b["size"], _full(run, "data.crop_size"), protocol)
        rows.append({"config": run["config"], "profile": run["profile"], **{k: b[k] for k in SETTINGS},
                     "crop": b["size"], **values,
                     "train peak GB": None if peak is None or pd.isna(peak) else peak / 1024,
                     "memory measured as": b["memory_kind"],
                     "MMSeg train memory GB": None if gap else doc.get((run["config"], "mmseg", "train_memory")),
                     "vs MMSeg memory": f"not comparable: {gap}" if gap else "same protocol", "run_id": run["run_id"]})
    cols = (["config", "profile", *SETTINGS, "crop"] + [label for _, label in TRAIN_BENCH_COLUMNS]
            + ["train peak GB", "memory measured as", "MMSeg train memory GB", "vs MMSeg memory", "run_id"])
    return pd.DataFrame(rows, columns=cols)


def documented_speed_view(c: Collected) -> pd.DataFrame:
    """The documented speed, size and memory of every configuration, each under its own protocol."""
    doc = documented(c)
    configs = [n for n in _config_order(c) if any((n, s, m) in doc for s, m, _ in DOCUMENTED_BENCH)]
    return pd.DataFrame([{"config": n, **{label: doc.get((n, s, m)) for s, m, label in DOCUMENTED_BENCH}}
                         for n in configs], columns=["config"] + [label for _, _, label in DOCUMENTED_BENCH])


def documented_bench_protocols(c: Collected) -> dict[str, str]:
    """Column label -> the documented protocol of that column's figures (one per source)."""
    return {label: _documented_protocol(c, source, metric) for source, metric, label in DOCUMENTED_BENCH}


KERNEL_SHAPE = ["kernel", "direction", "dtype", "B", "H", "N", "D", "C"]


def kernel_stat(c: Collected) -> str | None:
    """The one timing statistic the kernels view shows: the median when the profile has it."""
    if c.kernels.empty or "stat" not in c.kernels:
        return None
    stats = list(dict.fromkeys(c.kernels["stat"].dropna()))
    return "median" if "median" in stats else (stats[0] if stats else None)


def kernels_view(c: Collected) -> pd.DataFrame:
    """TFLOP/s and fraction of peak per shape, one column pair per implementation."""
    k = c.kernels
    if k.empty:
        return pd.DataFrame(columns=KERNEL_SHAPE)
    stat = kernel_stat(c)
    if stat is not None:
        k = k[k["stat"] == stat]
    keys = [col for col in KERNEL_SHAPE if col in k]
    values = [col for col in ("tflops", "frac_peak") if col in k]
    wide = k.groupby(keys + ["impl"], dropna=False, sort=False)[values].first().unstack("impl")
    wide.columns = [f"{impl} {'TFLOP/s' if v == 'tflops' else 'frac peak'}" for v, impl in wide.columns]
    # Each implementation's TFLOP/s then its fraction of peak, side by side.
    impls = list(dict.fromkeys(k["impl"]))
    ordered = [f"{i} {name}" for i in impls for name in ("TFLOP/s", "frac peak") if f"{i} {name}" in wide]
    return wide[ordered].reset_index()


def kernel_check_view(c: Collected) -> pd.DataFrame:
    """The newest interpreter correctness check: per shape, dtype and output (the forward
    result and each gradient), the kernel's max abs error against the PyTorch reference, the
    error allowed and the result."""
    k = c.kernel_check
    cols = ["shape", "dtype", "output", "max abs error", "limit", "result"]
    if k.empty:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame({"shape": k["shape"], "dtype": k["dtype"], "output": k["output"],
                         "max abs error": k["max_abs_err"], "limit": k["limit"],
                         "result": k["passed"].map({True: "pass", False: "FAIL"})}, columns=cols)


def curves_view(c: Collected) -> pd.DataFrame:
    """Per shown run: how far training went and where loss, lr and val mIoU ended."""
    rows = []
    shown = set(shown_runs(c)["run_id"]) if not c.runs.empty else set()
    for run_id, g in c.curves[c.curves["run_id"].isin(shown)].groupby("run_id", sort=False):
        last = {m: s.sort_values("step").iloc[-1] for m, s in g.groupby("metric")}
        val = g[g["metric"] == contract.VAL_MIOU]
        best = val.loc[val["value"].idxmax()] if not val.empty else None
        rows.append({"config": g["config"].iloc[0], "profile": g["profile"].iloc[0],
                     "last iteration": int(g["step"].max()),
                     "final loss": last[contract.TRAIN_LOSS]["value"] if contract.TRAIN_LOSS in last else None,
                     "final lr": last[contract.TRAIN_LR]["value"] if contract.TRAIN_LR in last else None,
                     "last val mIoU": last[contract.VAL_MIOU]["value"] if contract.VAL_MIOU in last else None,
                     "best val mIoU": None if best is None else best["value"],
                     "best at iteration": None if best is None else int(best["step"]),
                     "run_id": run_id})
    cols = ["config", "profile", "last iteration", "final loss", "final lr", "last val mIoU",
            "best val mIoU", "best at iteration", "run_id"]
    return pd.DataFrame(rows, columns=cols)


def _shorten(gaps: str, keep: int = 3) -> str:
    parts = [g for g in gaps.split("; ") if g]
    return "; ".join(parts[:keep]) + (f"; and {len(parts) - keep} more" if len(parts) > keep else "")


def protocols_view(c: Collected) -> pd.DataFrame:
    """What produced every shown run's figures, read from its own tags and params: the data, how
    its settings differ from the full protocol, the encoder's initial weights and the training
    precision, then the evaluation protocols."""
    runs = shown_runs(c)
    cols = ["config", "profile", "status", "data", "data note", "differs from the full protocol",
            "weights and precision", "ss", "ms+flip", "run_id"]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame({"config": runs["config"], "profile": runs["profile"],
                         "status": [_run_state(r, True)[0] for _, r in runs.iterrows()], "data": runs["data"],
                         "data note": runs["val_data_note"],
                         "differs from the full protocol": runs["protocol_gaps"].map(_shorten),
                         "weights and precision": runs["training"], "ss": runs["ss_protocol"],
                         "ms+flip": runs["msflip_protocol"], "run_id": runs["run_id"]}, columns=cols)


PROTOCOLS = ("reference", "mmseg", "paddlevit")


def released_view(c: Collected) -> pd.DataFrame:
    """Each evaluated checkpoint (and mode): its source's documented figure for its configuration,
    its mIoU under its own protocol and under every protocol it was evaluated with (the newest
    run each), the data it was evaluated on, and the difference own protocol − documented (on the
    verified ADE20K validation split only)."""
    ev = c.evals
    label = {p: f"under {SOURCE_LABEL.get(p, p)}" for p in PROTOCOLS}
    cols = (["checkpoint", "source", "config", "eval", "data", "documented", "own protocol", "under own"]
            + [label[p] for p in PROTOCOLS] + ["Δ own − documented", "protocol (own)", "run_id"])
    if ev.empty:
        return pd.DataFrame(columns=cols)
    doc = documented(c)
    rows = []
    newest = ev.sort_values("start_time", kind="stable").groupby(["checkpoint", "mode", "protocol"]).tail(1)
    for (checkpoint, mode), g in newest.groupby(["checkpoint", "mode"], sort=False):
        last = g.iloc[-1]
        source, config = last["source"], last["config"]
        by_protocol = {r.protocol: r for r in g.itertuples()}
        own = by_protocol.get(source)
        documented_value = doc.get((config, source, "miou_ss" if mode == "ss" else "miou_msflip"))
        own_value = None if own is None else own.mIoU
        rows.append({"checkpoint": checkpoint, "source": SOURCE_LABEL.get(source, source), "config": config,
                     "eval": "ss" if mode == "ss" else "ms+flip", "data": last["data"], "documented": documented_value,
                     "own protocol": source, "under own": own_value,
                     **{label[p]: (by_protocol[p].mIoU if p in by_protocol else None) for p in PROTOCOLS},
                     # a difference to an ADE20K figure only for an evaluation on the verified ADE20K val split
                     "Δ own − documented": (own_value - documented_value
                                            if own_value is not None and documented_value is not None
                                            and own.val_data == contract.VAL_ADE20K else None),
                     "protocol (own)": "" if own is None else own.protocol_text,
                     "run_id": last["run_id"] if own is None else own.run_id})
    return pd.DataFrame(rows, columns=cols)


def sources_view() -> pd.DataFrame:
    """Who documented each figure, and under which protocol."""
    return pd.DataFrame([{"source": SOURCE_LABEL.get(name, name), "title": s.get("title", ""),
                          "protocol": s.get("protocol", "")} for name, s in documented_sources().items()])
