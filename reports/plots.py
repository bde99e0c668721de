"""The report's figures as PNG bytes (matplotlib, Agg: no display is ever needed)."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from harness import contract  # noqa: E402
from reports.collect import DATA_LABEL  # noqa: E402
from reports.tables import DOCUMENTED_MIOU, EVALS, miou_label  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def bar_labels(view: pd.DataFrame) -> pd.Series:
    """Each row's label under its bars: the configuration, its profile unless full, and on a
    second line the data of any run not on the verified ADE20K validation split (its bars are
    not ADE20K val figures)."""
    other_data = view["data"].ne("") & ~view["data"].str.startswith(f"{DATA_LABEL[contract.VAL_ADE20K]} (")
    profile = view["profile"].map(lambda p: "" if p in ("", "full") else f" [{p}]")
    return view["config"] + profile + np.where(other_data, "\n" + view["data"], "")


def miou_plot(view: pd.DataFrame) -> bytes | None:
    """Grouped bars per configuration: every documented mIoU, then the reproduced ones."""
    series = [miou_label(s, m) for s, m in DOCUMENTED_MIOU]
    rows = view.assign(label=bar_labels(view))
    rows = rows.drop_duplicates("label")
    # Hatching sets the reproduced bars apart from the documented ones at a glance.
    columns = [(c, None) for c in series] + [(f"segrepro {n}", "//") for n, _, _ in EVALS]
    columns = [(c, h) for c, h in columns if rows[c].notna().any()]
    if not columns or rows.empty:
        return None
    x = np.arange(len(rows))
    width = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(rows)), 4.5))
    for i, (col, hatch) in enumerate(columns):
        ax.bar(x + (i - (len(columns) - 1) / 2) * width, rows[col].astype(float), width, label=col, hatch=hatch)
    ax.set_xticks(x, rows["label"], rotation=30, ha="right")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("Documented (ADE20K val) vs reproduced mIoU (segrepro: on the data named under each label)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars fill the axes
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def curves_plot(curves: pd.DataFrame) -> bytes | None:
    """Loss, learning rate and val mIoU against iteration, one line per run."""
    if curves.empty:
        return None
    panels = [(contract.TRAIN_LOSS, "training loss"), (contract.TRAIN_LR, "learning rate"),
              (contract.VAL_MIOU, "val mIoU (%)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (metric, title) in zip(axes, panels):
        for (config, profile, run_id), g in curves[curves["metric"] == metric].groupby(
                ["config", "profile", "run_id"], sort=False):
            g = g.sort_values("step")
            ax.plot(g["step"], g["value"], marker="o" if len(g) < 20 else None, markersize=3,
                    label=f"{config} ({profile}, {run_id[:8]})")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def kernels_plot(kernels: pd.DataFrame, stat: str | None) -> bytes | None:
    """TFLOP/s against sequence length, one panel per kernel, one line per implementation,
    direction and head shape."""
    if kernels.empty:
        return None
    k = kernels if stat is None else kernels[kernels["stat"] == stat]
    names = list(dict.fromkeys(k["kernel"]))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    line_keys = [c for c in ("impl", "direction", "H", "D", "dtype") if c in k]
    for ax, name in zip(axes[0], names):
        for key, g in k[k["kernel"] == name].groupby(line_keys, dropna=False, sort=False):
            g = g.sort_values("N")
            ax.plot(g["N"], g["tflops"], marker="o", markersize=3,
                    label=" ".join(f"{c}={v}" if c in ("H", "D") else str(v) for c, v in zip(line_keys, key)))
        ax.set_title(name)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("TFLOP/s" + (f" ({stat})" if stat else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _png(fig)
