"""One MLflow store for all report tests, written through harness.tracking (the writer every
command uses) with real zoo configurations, plus the kernels runs `segrepro kernels profile`
logs: the interpreter correctness check as it really runs here, and timing rows as the
profiler builds them on a GPU (with times stated here: this machine times nothing).

Each configuration run records the data it read, from real trees: the official validation
names with the record of the official archive (verified), the same names without it
(unverified), and a generated dataset."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.config import load_config, load_documented
from harness.contract import (AACC, BENCH_GFLOPS, BENCH_IMAGES_PER_S, BENCH_LATENCY_MEDIAN_MS, BENCH_LATENCY_P90_MS,
                              BENCH_PARAMS_M, BENCH_PEAK_MEMORY_MB, BENCH_PREFIX, BENCH_TRAIN, BENCH_TRAIN_PREFIX, MACC,
                              MSFLIP_MIOU, RUN_KEY, SS, SS_MIOU, TRAIN_LOSS, TRAIN_LR, TRAINING_ID, VAL_MIOU, WALL_TIME,
                              default_tracking_uri, metric)
from harness.data.download import OFFICIAL_SHA1, OFFICIAL_URL
from harness.data.fingerprint import split_fingerprint, write_download_record
from harness.data.synth import synthesize
from harness.identity import training_id
from harness.tracking import MetricsLogger, Tracker, init_tag

PRETRAINED_SHA256 = "5e" * 32  # what weights.resolve records for a cached ImageNet checkpoint
CHECK_SPEC = "attn:B=1,H=1,N=20,D=16;mask:B=1,N=20,C=8,D=16"  # small: the interpreter is slow
TIMED_SHAPES = ("attn:B=8,H=3,N=257,D=64;attn:B=8,H=3,N=1025,D=64;attn:B=8,H=3,N=4097,D=64;"
                "mask:B=8,N=256,C=150,D=192;mask:B=8,N=1024,C=150,D=192")
TIMED_MS = {"triton": 0.5, "reference": 0.8}  # median fwd ms at N = 257, scaled by N below


@dataclass
class Store:
    uri: str
    root: Path
    doc: dict           # (config, source, metric) -> documented value
    runs: dict          # label -> run id
    logged: dict        # label -> {metric: value} of the final metrics each run logged
    timed_rows: list    # the kernels profile run's rows (as profile_gpu builds them)
    check_rows: list    # the kernels check run's rows (correctness_check, run here)
    pretrained_init: str  # the init tag of the "tiny" run
    data: dict          # "verified" | "unverified" | "generated" -> dataset root


def _datasets(root: Path, official_val_layout) -> dict[str, Path]:
    verified = official_val_layout(root / "ade")
    write_download_record(verified, OFFICIAL_SHA1, OFFICIAL_URL)  # as segrepro data download leaves it
    generated = synthesize(root / "synth", train=2, val=3, size=(8, 8), classes=2)
    return {"verified": verified, "unverified": official_val_layout(root / "ade-elsewhere"), "generated": generated}


def _cfg(name: str, init: str = "pretrained", renamed: str | None = None, **kw):
    """A configuration resolved as weights.resolve leaves it: from scratch or from a checkpoint;
    ``renamed``: its profile given another name (a copied profile file)."""
    overrides = kw.pop("overrides", {})
    model = {"init": init, "init_sha256": PRETRAINED_SHA256 if init == "pretrained" else None}
    cfg = load_config(name, overrides={**overrides, "model": model}, **kw)
    return dataclasses.replace(cfg, profile=renamed) if renamed else cfg


def _config_run(tracker, parent, facts, cfg, data: Path, *, metrics=None, curves=None, bench=None, error=None,
                finish=True):
    """What the reproduce driver does with a configuration's run, through the same writer.
    ``bench``: the benchmark protocols' params the config does not hold."""
    splits = {split: split_fingerprint(data, split) for split in ("training", "validation")}
    training = training_id(cfg, splits["training"]["fingerprint"])
    run_id, _ = tracker.child_run(cfg, parent, facts, {TRAINING_ID: training, RUN_KEY: training})
    tracker.log_dataset(run_id, data, splits, context="training")
    logger = MetricsLogger({"uri": tracker.uri, "run_id": run_id})
    for step, values in curves or []:
        logger.log(values, step)
    if bench:
        tracker.log_params(run_id, bench)
    tracker.log_final_metrics(run_id, metrics or {})
    if finish:
        tracker.finish(run_id, error)
    return run_id


def _timed_rows(facts: dict) -> list[dict]:
    from kernels import profile

    rows = []
    for shape in profile.parse_spec(TIMED_SHAPES):
        flops = profile.attention_flops if shape.kind == "attn" else profile.mask_flops
        for impl, ms in TIMED_MS.items():
            for direction in ("fwd", "bwd"):
                median = ms * (shape.N / 257) ** 1.5 * (1 if direction == "fwd" else 2.5)
                rows += profile.timing_rows(shape, "fp16", impl, direction, [median, 0.9 * median, 1.2 * median],
                                            "ok", flops(shape, direction), profile.interface_bytes(shape, direction, 2),
                                            facts, [])
    return rows


@pytest.fixture(scope="session")
def store(tmp_path_factory, official_val_layout) -> Store:
    from kernels import profile
    from kernels.device import device_facts

    root = tmp_path_factory.mktemp("mlflow")
    uri = default_tracking_uri(root)
    tracker = Tracker(uri, root)
    facts = device_facts()
    doc = {(d["config"], d["source"], d["metric"]): d["value"] for d in load_documented()}
    data = _datasets(tmp_path_factory.mktemp("data"), official_val_layout)
    parent = tracker.start_parent(["reproduce", "--configs", "seed"])

    curves = [(s, {TRAIN_LOSS: 5.0 - s / 50, TRAIN_LR: 1e-3 * (1 - s / 101) ** 0.9,
                   **({VAL_MIOU: 20.0 + s / 10} if s in (50, 100) else {})}) for s in range(0, 101, 10)]
    bench = {BENCH_IMAGES_PER_S: 3.25, BENCH_LATENCY_MEDIAN_MS: 307.5, BENCH_LATENCY_P90_MS: 320.25,
             BENCH_GFLOPS: 31.5, BENCH_PARAMS_M: 6.75, BENCH_PEAK_MEMORY_MB: 812.0}
    train_bench = {metric(BENCH_TRAIN, "images_per_s"): 1.5, metric(BENCH_TRAIN, "step_median_ms"): 2650.0,
                   metric(BENCH_TRAIN, "step_p90_ms"): 2800.0, metric(BENCH_TRAIN, "peak_memory_mb"): 1900.0}
    gpu_train_bench = {**train_bench, metric(BENCH_TRAIN, "peak_memory_mb"): 2150.0}
    # as harness.benchmark logs its protocols: a CPU smoke-sized run and a GPU run at the full size
    cpu_params = {BENCH_PREFIX + "device": "cpu", BENCH_PREFIX + "image_size": 512,
                  BENCH_TRAIN_PREFIX + "device": "cpu", BENCH_TRAIN_PREFIX + "precision": "fp32",
                  BENCH_TRAIN_PREFIX + "batch_size": 4, BENCH_TRAIN_PREFIX + "crop": 64,
                  BENCH_TRAIN_PREFIX + "peak_memory_kind": "process RSS"}
    gpu_params = {BENCH_PREFIX + "device": "cuda:0", BENCH_PREFIX + "image_size": 512,
                  BENCH_TRAIN_PREFIX + "device": "cuda:0", BENCH_TRAIN_PREFIX + "precision": "fp32",
                  BENCH_TRAIN_PREFIX + "batch_size": 1, BENCH_TRAIN_PREFIX + "crop": 512,
                  BENCH_TRAIN_PREFIX + "peak_memory_kind": "CUDA allocator peak"}
    above = 28.86  # a smoke-sized figure far from any documented one
    logged = {
        "tiny": {SS_MIOU: doc["seg_tiny_mask", "reference", "miou_ss"] + 0.3,
                 MSFLIP_MIOU: doc["seg_tiny_mask", "reference", "miou_msflip"] - 0.4,
                 metric(SS, MACC): 50.0, metric(SS, AACC): 75.0, **bench, **train_bench, WALL_TIME: 600.0},
        "small": {SS_MIOU: doc["seg_small_mask", "reference", "miou_ss"] - 2.0,
                  MSFLIP_MIOU: doc["seg_small_mask", "reference", "miou_msflip"] + 1.5, **bench, **gpu_train_bench},
        "base_smoke": {SS_MIOU: 3.2, MSFLIP_MIOU: 3.5},
        "deit_mask_pvt": {SS_MIOU: doc["seg_base_deit_mask", "paddlevit", "miou_ss"] + 0.1},
        "tiny_renamed_smoke": {SS_MIOU: doc["seg_tiny_mask", "reference", "miou_ss"] + above},
        "base_full_generated": {SS_MIOU: doc["seg_base_mask", "reference", "miou_ss"] + above,
                                MSFLIP_MIOU: doc["seg_base_mask", "reference", "miou_msflip"] + above},
        "small_unverified": {SS_MIOU: doc["seg_small_mask", "reference", "miou_ss"]},
        "small_renamed_smoke": {SS_MIOU: doc["seg_small_mask", "reference", "miou_ss"]},
    }
    tiny = _cfg("seg_tiny_mask")
    verified, unverified, generated = data["verified"], data["unverified"], data["generated"]
    runs = {
        # An older failed run of the same configuration and profile (from scratch, so another
        # config hash): superseded, shown only in results.csv.
        "tiny_old": _config_run(tracker, parent, facts, _cfg("seg_tiny_mask", init="scratch"), verified,
                                error="superseded failure"),
        "tiny": _config_run(tracker, parent, facts, tiny, verified, metrics=logged["tiny"], curves=curves,
                            bench=cpu_params),
        "small": _config_run(tracker, parent, {**facts, "gpu_name": "NVIDIA H100 (stated)"}, _cfg("seg_small_mask"),
                             verified, metrics=logged["small"], bench=gpu_params),
        "base_smoke": _config_run(tracker, parent, facts,
                                  _cfg("seg_base_mask", init="scratch", profile="smoke",
                                       overrides={"optim": {"amp": "bf16"}}),
                                  generated, metrics=logged["base_smoke"]),
        "deit_linear_failed": _config_run(tracker, parent, facts, _cfg("seg_base_deit_linear"), verified,
                                          error="CUDA out of memory\nTraceback (most recent call last): ..."),
        # Its process dies mid-run: the next process in this run directory closes it.
        "large_stale": _config_run(tracker, parent, facts, _cfg("seg_large_mask_640", profile="smoke"), generated,
                                   finish=False),
        # A profile's name decides nothing: the full protocol on verified data under another name gets a verdict.
        "deit_mask_pvt": _config_run(tracker, parent, facts,
                                     _cfg("seg_base_deit_mask", recipe="paddlevit", renamed="pvt-run"), verified,
                                     metrics=logged["deit_mask_pvt"]),
        # ... and the smoke profile copied under another name gets none, on generated or on real data
        "tiny_renamed_smoke": _config_run(tracker, parent, facts,
                                          _cfg("seg_tiny_mask", profile="smoke", renamed="full-copy"), generated,
                                          metrics=logged["tiny_renamed_smoke"]),
        "small_renamed_smoke": _config_run(tracker, parent, facts,
                                           _cfg("seg_small_mask", profile="smoke", renamed="full-copy"), verified,
                                           metrics=logged["small_renamed_smoke"]),
        # the full protocol on generated data, and on the official names without the archive's record
        "base_full_generated": _config_run(tracker, parent, facts, _cfg("seg_base_mask"), generated,
                                           metrics=logged["base_full_generated"]),
        "small_unverified": _config_run(tracker, parent, facts, _cfg("seg_small_mask", renamed="mine"), unverified,
                                        metrics=logged["small_unverified"]),
    }
    tracker.finish(parent)
    assert tracker.close_stale(root) == [runs["large_stale"]]

    timed = _timed_rows({**facts, "gpu_name": "stated", "peak_matmul_tflops": 20.0, "peak_copy_gb_s": 1000.0})
    runs["kernels"] = tracker.log_kernel_profile("gpu", facts, timed, profile.csv_text(timed),
                                                 {"shapes": TIMED_SHAPES, "dtype": "fp16"})
    check = profile.correctness_check(profile.parse_spec(CHECK_SPEC), ["fp32", "fp16"])
    runs["kernels_check"] = tracker.log_kernel_profile("check", facts, check, profile.csv_text(check),
                                                       {"shapes": CHECK_SPEC, "dtype": "default"})
    return Store(uri=uri, root=root, doc=doc, runs=runs, logged=logged, timed_rows=timed, check_rows=check,
                 pretrained_init=init_tag(tiny), data=data)


@pytest.fixture(scope="session")
def report(store, tmp_path_factory):
    """The report built once from the store: (output directory, build_report's result)."""
    from reports.build import build_report

    out = tmp_path_factory.mktemp("report")
    return out, build_report(store.uri, out)
