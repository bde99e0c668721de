"""One generated MLflow store for all report tests, written through MLflow's own API the way
`segrepro reproduce` writes it (see reports/collect.py for the conventions)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.config import load_documented

EVAL_PARAMS = {"eval.window": "512", "eval.stride": "480", "eval.scales": "[0.5, 0.75, 1.0, 1.25, 1.5, 1.75]",
               "eval.flip": "True", "eval.small_views": "upsample"}
BENCH_PARAMS = {"bench.batch_size": "1", "bench.precision": "fp32", "bench.image_size": "512", "bench.device": "cpu"}
# what an encoder trained from the Hugging Face checkpoint records (harness.tracking.init_tag)
PRETRAINED_INIT = "vit_tiny_patch16_384.augreg_in21k_ft_in1k sha256:" + "5e" * 32
KERNEL_ROWS = [  # kernel, impl, direction, B, H, N, D, C, stat, tflops (ms, gbps, frac_peak derived)
    (k, impl, "fwd", 8, 3, n, 64, c, stat, tf)
    for k, c in (("attention", ""), ("mask_decoder", 150))
    for impl, scale in (("torch", 1.0), ("triton", 1.6))
    for n, base in ((257, 2.0), (1025, 5.0), (4097, 9.0))
    for stat, tf in (("median", base * scale), ("p90", base * scale * 0.8))
]


@dataclass
class Store:
    uri: str
    root: Path
    doc: dict           # (config, source, metric) -> documented value
    runs: dict          # label -> run id
    logged: dict        # label -> {metric: value} of the final metrics each run logged
    kernel_rows: list   # the kernels profile CSV's rows (see KERNEL_ROWS)
    pretrained_init: str = PRETRAINED_INIT  # the init tag of the "tiny" run


def _child(client, exp, parent, start, config, profile, status, metrics, *, recipe="reference", error=None,
           curves=None, bench=False, mlflow_status=None, init="scratch", amp="fp32"):
    from mlflow.entities import Metric, Param, RunTag

    tags = {"segrepro.kind": "config", "segrepro.config": config, "segrepro.recipe": recipe,
            "segrepro.profile": profile, "segrepro.config_hash": f"hash-{config}", "segrepro.status": status,
            "mlflow.parentRunId": parent, "segrepro.init": init}
    if error:
        tags["segrepro.error"] = error
    run = client.create_run(exp, start_time=start, tags=tags, run_name=config)
    rid = run.info.run_id
    params = {"name": config, "recipe": recipe, "profile": profile, "model.d_model": "192",
              "git_commit": "0" * 40, "device": "cpu", "versions.torch": "2.14.1", "optim.amp": amp, **EVAL_PARAMS,
              **(BENCH_PARAMS if bench else {})}
    batch = [Metric(k, v, start, 0) for k, v in metrics.items()]
    for metric, points in (curves or {}).items():
        batch += [Metric(metric, v, start + step, step) for step, v in points]
    client.log_batch(rid, metrics=batch, params=[Param(k, v) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(rid, mlflow_status or {"finished": "FINISHED", "failed": "FAILED"}[status],
                          end_time=start + 1000)
    return rid


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Store:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("segrepro", artifact_location=(root / "artifacts").as_uri())
    doc = {(d["config"], d["source"], d["metric"]): d["value"] for d in load_documented()}
    parent = client.create_run(exp, start_time=1_000_000, tags={"segrepro.kind": "reproduce"}).info.run_id

    loss = [(s, 5.0 - s / 50) for s in range(0, 101, 10)]
    lr = [(s, 1e-3 * (1 - s / 101) ** 0.9) for s in range(0, 101, 10)]
    val = [(50, 20.0), (100, 30.0)]
    bench = {"bench/images_per_s": 3.25, "bench/latency_median_ms": 307.5, "bench/latency_p90_ms": 320.25,
             "bench/gflops": 31.5, "bench/params_m": 6.75, "bench/peak_memory_mb": 812.0}
    logged = {
        "tiny": {"ss/mIoU": doc["seg_tiny_mask", "reference", "miou_ss"] + 0.3,
                 "msflip/mIoU": doc["seg_tiny_mask", "reference", "miou_msflip"] - 0.4,
                 "ss/mAcc": 50.0, "ss/aAcc": 75.0, **bench, "wall_time_s": 600.0},
        "small": {"ss/mIoU": doc["seg_small_mask", "reference", "miou_ss"] - 2.0,
                  "msflip/mIoU": doc["seg_small_mask", "reference", "miou_msflip"] + 1.5},
        "base_smoke": {"ss/mIoU": 3.2, "msflip/mIoU": 3.5},
        "deit_mask_pvt": {"ss/mIoU": doc["seg_base_deit_mask", "paddlevit", "miou_ss"] + 0.1},
    }
    runs = {
        # An older failed run of the same configuration and profile: superseded, shown only in results.csv.
        "tiny_old": _child(client, exp, parent, 2_000_000, "seg_tiny_mask", "full", "failed", {},
                           error="superseded failure"),
        "tiny": _child(client, exp, parent, 3_000_000, "seg_tiny_mask", "full", "finished", logged["tiny"],
                       curves={"train/loss": loss, "train/lr": lr, "val/mIoU": val}, bench=True,
                       init=PRETRAINED_INIT),
        "small": _child(client, exp, parent, 3_100_000, "seg_small_mask", "full", "finished", logged["small"]),
        "base_smoke": _child(client, exp, parent, 3_200_000, "seg_base_mask", "smoke", "finished",
                             logged["base_smoke"], amp="bf16"),
        "deit_linear_failed": _child(client, exp, parent, 3_300_000, "seg_base_deit_linear", "full", "failed", {},
                                     error="CUDA out of memory\nTraceback (most recent call last): ..."),
        # The process died mid-run: the tag still says running, MLflow's own status says FAILED.
        "large_stale": _child(client, exp, parent, 3_350_000, "seg_large_mask_640", "smoke", "running", {},
                              mlflow_status="FAILED"),
        "deit_mask_pvt": _child(client, exp, parent, 3_400_000, "seg_base_deit_mask", "full", "finished",
                                logged["deit_mask_pvt"], recipe="paddlevit"),
    }
    client.set_terminated(parent, "FINISHED")

    kernels = client.create_run(exp, start_time=4_000_000, tags={"segrepro.kind": "kernels_profile"})
    runs["kernels"] = kernels.info.run_id
    csv_path = root / "kernels_profile.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kernel", "impl", "direction", "B", "H", "N", "D", "C", "dtype", "stat", "ms", "tflops",
                    "gbps", "frac_peak"])
        for k, impl, d, b, h, n, dd, c, stat, tf in KERNEL_ROWS:
            w.writerow([k, impl, d, b, h, n, dd, c, "float32", stat, 1.0, tf, 100.0, tf / 20.0])
    client.log_param(runs["kernels"], "device", "cpu")
    client.log_artifact(runs["kernels"], str(csv_path))
    client.set_terminated(runs["kernels"], "FINISHED")
    return Store(uri=uri, root=root, doc=doc, runs=runs, logged=logged, kernel_rows=KERNEL_ROWS)


@pytest.fixture(scope="session")
def report(store, tmp_path_factory):
    """The report built once from the store: (output directory, build_report's result)."""
    from reports.build import build_report

    out = tmp_path_factory.mktemp("report")
    return out, build_report(store.uri, out)
