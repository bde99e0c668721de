"""The report's views, each built from the long table and the runs of a ``Collected``.

Which run a view shows: the newest run of each (configuration, profile); older runs stay in
results.csv. Which documented figure a reproduced mIoU is compared with (the baseline): the
figure of the source the run's recipe follows (recipes are named after the sources), else the
reference implementation's, else PaddleViT's. The zoo YAMLs are the reference recipe, so for
a default run this is the reference figure; the view names the baseline in its "vs" columns.
"""
from __future__ import annotations

import pandas as pd

from harness import contract
from harness.config import documented_sources, zoo_names
from reports.collect import SOURCE, Collected

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
    if run["profile"] == "smoke":
        return "finished", "no verdict (smoke)"
    return "finished", None


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
                   "recipe": "" if run is None else run["recipe"]}
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
    cols = (["config", "profile", "recipe"] + [miou_label(s, m) for s, m in DOCUMENTED_MIOU]
            + [f"segrepro {n}" for n, _, _ in EVALS] + [f"{k} {n}" for n, _, _ in EVALS for k in ("vs", "Δ")]
            + [f"verdict {n}" for n, _, _ in EVALS] + ["status", "run_id"])
    return pd.DataFrame(rows, columns=cols)


BENCH_COLUMNS = [(contract.BENCH_IMAGES_PER_S, "images/s"), (contract.BENCH_LATENCY_MEDIAN_MS, "latency median ms"),
                 (contract.BENCH_LATENCY_P90_MS, "latency p90 ms"), (contract.BENCH_GFLOPS, "GFLOPs"),
                 (contract.BENCH_PARAMS_M, "params M"), (contract.BENCH_PEAK_MEMORY_MB, "peak memory MB")]
DOCUMENTED_BENCH = [("reference", "fps", "reference fps"), ("mmseg", "fps", "MMSeg fps"),
                    ("reference", "params", "reference params M"), ("mmseg", "train_memory", "MMSeg train memory GB")]


def throughput_view(c: Collected) -> pd.DataFrame:
    """Every shown run that logged a benchmark, beside the documented speed, size and memory."""
    doc = documented(c)
    rows = []
    for _, run in shown_runs(c).iterrows():
        values = {label: run.get(f"metrics.{key}") for key, label in BENCH_COLUMNS}
        if all(v is None or pd.isna(v) for v in values.values()):
            continue
        rows.append({"config": run["config"], "profile": run["profile"], **values,
                     "device": run["device"], "protocol": run["bench_protocol"],
                     **{label: doc.get((run["config"], s, m)) for s, m, label in DOCUMENTED_BENCH},
                     "run_id": run["run_id"]})
    cols = (["config", "profile"] + [label for _, label in BENCH_COLUMNS] + ["device", "protocol"]
            + [label for _, _, label in DOCUMENTED_BENCH] + ["run_id"])
    return pd.DataFrame(rows, columns=cols).astype({label: float for _, label in BENCH_COLUMNS})


def documented_bench_protocols(c: Collected) -> dict[str, str]:
    """Column label -> the documented protocol of that column's figures (one per source)."""
    doc = c.long[c.long["source"] != SOURCE]
    out = {}
    for source, metric, label in DOCUMENTED_BENCH:
        protocols = doc.loc[(doc["source"] == source) & (doc["metric"] == metric), "protocol"].unique()
        out[label] = "; ".join(protocols)
    return out


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


def protocols_view(c: Collected) -> pd.DataFrame:
    """What produced every shown run's figures, read from its own tags and params: the
    encoder's initial weights and the training precision, then the evaluation protocols."""
    runs = shown_runs(c)
    cols = ["config", "profile", "training", "ss_protocol", "msflip_protocol", "run_id"]
    names = {"training": "weights and precision", "ss_protocol": "ss", "msflip_protocol": "ms+flip"}
    if runs.empty:
        return pd.DataFrame(columns=[names.get(c, c) for c in cols])
    return runs[cols].rename(columns=names).reset_index(drop=True)


PROTOCOLS = ("reference", "mmseg", "paddlevit")


def released_view(c: Collected) -> pd.DataFrame:
    """Each evaluated checkpoint (and mode): its source's documented figure for its configuration,
    its mIoU under its own protocol and under every protocol it was evaluated with (the newest
    run each), and the difference own protocol − documented."""
    ev = c.evals
    label = {p: f"under {SOURCE_LABEL.get(p, p)}" for p in PROTOCOLS}
    cols = (["checkpoint", "source", "config", "eval", "documented", "own protocol", "under own"]
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
                     "eval": "ss" if mode == "ss" else "ms+flip", "documented": documented_value,
                     "own protocol": source, "under own": own_value,
                     **{label[p]: (by_protocol[p].mIoU if p in by_protocol else None) for p in PROTOCOLS},
                     "Δ own − documented": (own_value - documented_value
                                            if own_value is not None and documented_value is not None else None),
                     "protocol (own)": "" if own is None else own.protocol_text,
                     "run_id": last["run_id"] if own is None else own.run_id})
    return pd.DataFrame(rows, columns=cols)


def sources_view() -> pd.DataFrame:
    """Who documented each figure, and under which protocol."""
    return pd.DataFrame([{"source": SOURCE_LABEL.get(name, name), "title": s.get("title", ""),
                          "protocol": s.get("protocol", "")} for name, s in documented_sources().items()])
