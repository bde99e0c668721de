"""The report against a generated MLflow store: right numbers in the right cells, verdicts
included; documented figures are read from experiments/documented.yaml, never written here."""
from __future__ import annotations

import argparse
import json
import random

import pandas as pd
import pytest

from harness.config import load_documented, zoo_names
from reports import build, tables
from reports.collect import collect


def md_table(text: str, heading: str) -> list[dict]:
    """The rows of the Markdown table under ``## heading``, as {column: cell}."""
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def by_config(rows: list[dict], profile: str = "full") -> dict[str, dict]:
    """The rows of one profile (and the rows without a run) by configuration."""
    return {r["config"]: r for r in rows if r["profile"] in (profile, "")}


MIOU_SS = "mIoU single-scale: documented vs reproduced"
MIOU_MSFLIP = "mIoU multi-scale + flip: documented vs reproduced"


@pytest.fixture(scope="module")
def markdown(report):
    out, _ = report
    return (out / "report.md").read_text()


def test_miou_view_numbers_and_verdicts(store, report):
    _, result = report
    rows = by_config(result["miou"])
    doc, logged = store.doc, store.logged
    tiny = rows["seg_tiny_mask"]
    # Every documented source beside the reproduced figures.
    assert tiny["PaddleViT ss"] == doc["seg_tiny_mask", "paddlevit", "miou_ss"]
    assert tiny["reference ms+flip"] == doc["seg_tiny_mask", "reference", "miou_msflip"]
    assert tiny["MMSeg ss"] == doc["seg_tiny_mask", "mmseg", "miou_ss"]
    assert tiny["segrepro ss"] == pytest.approx(logged["tiny"]["ss/mIoU"])
    assert tiny["Δ ss"] == pytest.approx(logged["tiny"]["ss/mIoU"] - doc["seg_tiny_mask", "reference", "miou_ss"])
    assert tiny["Δ ms+flip"] == pytest.approx(
        logged["tiny"]["msflip/mIoU"] - doc["seg_tiny_mask", "reference", "miou_msflip"])
    assert (tiny["vs ss"], tiny["verdict ss"], tiny["verdict ms+flip"]) == ("reference", "reproduced", "reproduced")
    assert tiny["run_id"] == store.runs["tiny"]  # the newest run, not the superseded failure

    small = rows["seg_small_mask"]
    assert small["Δ ss"] == pytest.approx(-2.0)
    assert (small["verdict ss"], small["verdict ms+flip"]) == ("below", "above")


def test_baseline_follows_the_runs_recipe(store, report):
    doc = store.doc
    pvt, ref = doc["seg_base_deit_mask", "paddlevit", "miou_ss"], doc["seg_base_deit_mask", "reference", "miou_ss"]
    # Only meaningful if the two sources disagree by more than the tolerance.
    assert abs(pvt + 0.1 - ref) > tables.TOLERANCE
    row = by_config(report[1]["miou"], "pvt-run")["seg_base_deit_mask"]  # a profile's name decides nothing
    assert (row["vs ss"], row["verdict ss"]) == ("PaddleViT", "reproduced")
    assert row["Δ ss"] == pytest.approx(0.1)
    # PaddleViT documents no ms+flip: that column falls back to the reference, and nothing was logged.
    assert (row["vs ms+flip"], row["verdict ms+flip"]) == ("reference", "no result")


def test_smoke_failed_and_missing_rows(store, report):
    smoke = by_config(report[1]["miou"], "smoke")["seg_base_mask"]
    assert smoke["segrepro ss"] == pytest.approx(store.logged["base_smoke"]["ss/mIoU"])
    assert smoke["verdict ss"] == smoke["verdict ms+flip"] == "no verdict (generated data)"
    assert smoke["Δ ss"] is None and smoke["Δ ms+flip"] is None

    rows = by_config(report[1]["miou"])
    failed = rows["seg_base_deit_linear"]
    assert failed["verdict ss"] == "failed"
    assert failed["status"] == "failed: CUDA out of memory"  # first line of the error tag
    assert failed["run_id"] == store.runs["deit_linear_failed"]

    stale = by_config(report[1]["miou"], "smoke")["seg_large_mask_640"]  # closed by close_stale: its process died
    assert (stale["status"], stale["verdict ms+flip"]) == ("killed", "killed")

    run_configs = {"seg_tiny_mask", "seg_small_mask", "seg_base_mask", "seg_base_deit_linear", "seg_base_deit_mask",
                   "seg_large_mask_640"}
    for name in set(zoo_names()) - run_configs:
        assert rows[name]["verdict ss"] == rows[name]["status"] == "not run", name
    documented_only = {d["config"] for d in load_documented()} - set(zoo_names())
    assert documented_only, "documented.yaml lists a row with no zoo configuration"
    for name in documented_only:
        assert rows[name]["status"] == "no configuration"
    # one row per shown run (newest per configuration and profile), per zoo row not run, per documented-only row
    shown = len(set(store.runs) - {"tiny_old", "kernels", "kernels_check"})
    assert len(report[1]["miou"]) == shown + len(set(zoo_names()) - run_configs) + len(documented_only)


@pytest.mark.parametrize("label, profile, reason", [
    ("tiny_renamed_smoke", "full-copy", "generated data"),      # the smoke profile copied under another name
    ("base_full_generated", "full", "generated data"),          # the full protocol, on generated data
    ("small_unverified", "mine", "data unverified"),            # the official names without the archive's record
    ("small_renamed_smoke", "full-copy", "not the full protocol"),  # verified data, smoke settings renamed
])
def test_a_verdict_needs_the_verified_val_split_and_the_full_protocol(store, report, label, profile, reason):
    row = next(r for r in report[1]["miou"] if r["run_id"] == store.runs[label])
    assert row["profile"] == profile
    assert row["segrepro ss"] == pytest.approx(store.logged[label]["ss/mIoU"])  # the figure is shown ...
    assert row["verdict ss"] == f"no verdict ({reason})" and row["Δ ss"] is None  # ... never judged


def test_every_run_records_its_data(store, report, markdown):
    c = collect(store.uri)
    runs = c.runs.set_index("run_id")
    kinds = {"verified": "ade20k-val", "unverified": "ade20k-val-unverified", "generated": "generated"}
    for label, data in [("tiny", "verified"), ("small_unverified", "unverified"), ("base_smoke", "generated")]:
        run = runs.loc[store.runs[label]]
        assert (run["data_root"], run["val_data"]) == (str(store.data[data]), kinds[data])
    assert runs.loc[store.runs["tiny"], ["val_images", "train_images"]].tolist() == ["2000", "1"]
    assert runs.loc[store.runs["base_smoke"], "val_images"] == "3"
    # the header names every root the shown runs read, and what it is
    header = markdown.split("\n## ", 1)[0]
    assert f"- data: generated at {store.data['generated']} (3 validation images): " in header
    assert f"- data: ADE20K val at {store.data['verified']} (2000 validation images): " in header
    rows = {r["root"]: r for r in report[1]["data"]}
    assert "seg_tiny_mask [full-copy]" in rows[str(store.data["generated"])]["runs"]
    assert "segrepro_download.json" in rows[str(store.data["unverified"])]["why"]
    # the per-row data column of both mIoU tables
    for heading in (MIOU_SS, MIOU_MSFLIP):
        table = md_table(markdown, heading)
        assert {r["data"] for r in table if r["config"] == "seg_base_mask"} == {"generated (3 images)"}


def test_summary_counts(store, report, markdown):
    summary = report[1]["summary"]
    assert summary["ss"] == {
        "reproduced": ["seg_base_deit_mask [pvt-run]", "seg_tiny_mask"],
        "below": ["seg_small_mask"], "above": [],
        "no verdict": ["seg_base_mask (generated data)", "seg_base_mask [smoke] (generated data)",
                       "seg_small_mask [full-copy] (not the full protocol)", "seg_small_mask [mine] (data unverified)",
                       "seg_tiny_mask [full-copy] (generated data)"],
        "failed, stopped or running": ["seg_base_deit_linear (failed)", "seg_large_mask_640 [smoke] (killed)"],
        "not run": ["seg_base_patch8"]}
    assert (summary["ms+flip"]["reproduced"], summary["ms+flip"]["above"]) == (["seg_tiny_mask"], ["seg_small_mask"])
    assert "seg_base_deit_mask [pvt-run] (no result)" in summary["ms+flip"]["no verdict"]
    # the summary is the report's first section
    assert markdown.split("\n## ")[1].startswith("Summary\n")
    table = {r["outcome"]: r for r in md_table(markdown, "Summary")}
    assert table["reproduced (Δ within ±0.5)"]["ss"] == "2: seg_base_deit_mask [pvt-run], seg_tiny_mask"
    assert table["no verdict"]["ss"].startswith("5: ") and table["above"]["ss"] == "0"


def test_tolerance_is_a_parameter(store, report):
    c = collect(store.uri)
    strict = by_config(tables.miou_view(c, tolerance=0.1).to_dict("records"))
    assert strict["seg_tiny_mask"]["verdict ss"] == "above"  # +0.3
    assert strict["seg_tiny_mask"]["verdict ms+flip"] == "below"  # -0.4
    assert tables.verdict(0.5) == "reproduced" and tables.verdict(-0.51) == "below"


def test_results_csv_is_the_long_table(store, report):
    out, _ = report
    long = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])
    assert list(long.columns) == ["config", "source", "metric", "value", "protocol", "profile", "run_id", "status"]
    documented = long[long["source"] != "segrepro"]
    expected = pd.DataFrame(load_documented())
    assert len(documented) == len(expected)
    assert sorted(documented["value"]) == sorted(expected["value"])

    mine = long[long["source"] == "segrepro"]
    small = mine[mine["run_id"] == store.runs["small"]].set_index("metric")
    assert small.loc["miou_ss", "value"] == pytest.approx(store.logged["small"]["ss/mIoU"])
    assert "stride 480" in small.loc["miou_ss", "protocol"] and "single scale" in small.loc["miou_ss", "protocol"]
    assert "scales [0.5, 0.75" in small.loc["miou_msflip", "protocol"]
    tiny = mine[mine["run_id"] == store.runs["tiny"]].set_index("metric")
    assert tiny.loc["fps", "value"] == pytest.approx(store.logged["tiny"]["bench/images_per_s"])
    assert "batch 1, fp32" in tiny.loc["fps", "protocol"]
    # Every configuration run is listed, the superseded and the metric-less ones included.
    assert set(mine["run_id"]) == {v for k, v in store.runs.items() if not k.startswith("kernels")}
    assert set(mine.loc[mine["run_id"] == store.runs["tiny_old"], "status"]) == {"failed"}


def test_every_reproduced_figure_names_its_weights_and_precision(store, report, markdown):
    c = collect(store.uri)
    init = store.pretrained_init
    prov = tables.protocols_view(c).set_index(["config", "profile"])["weights and precision"]
    assert prov["seg_tiny_mask", "full"] == f"from {init}, trained in fp32"
    assert prov["seg_base_mask", "smoke"] == "from random init, trained in bf16"
    long = c.long[(c.long["source"] == "segrepro") & c.long["metric"].isin(["miou_ss", "miou_msflip"])]
    tiny = long[long["run_id"] == store.runs["tiny"]]
    assert len(tiny) == 2 and tiny["protocol"].str.endswith(f"; from {init}, trained in fp32").all()
    rows = by_config(md_table(markdown, "Runs: status, data and provenance"))
    assert init in rows["seg_tiny_mask"]["weights and precision"]


def test_throughput_compares_like_with_like(store, report):
    rows = {r["config"]: r for r in report[1]["throughput"]}
    assert sorted(rows) == ["seg_small_mask", "seg_tiny_mask"]  # the runs with a benchmark
    cpu, gpu, logged, doc = rows["seg_tiny_mask"], rows["seg_small_mask"], store.logged["tiny"], store.doc
    assert cpu["images/s"] == pytest.approx(logged["bench/images_per_s"])
    assert cpu["inference peak MB"] == pytest.approx(logged["bench/peak_memory_mb"])
    assert (cpu["device"], cpu["precision"], cpu["batch"], cpu["image"]) == ("cpu", "fp32", "1", "512")
    assert cpu["reference params M"] == doc["seg_tiny_mask", "reference", "params"]
    # a CPU figure never sits beside a GPU fps; a GPU one at MMSeg's batch, precision and full size does
    assert cpu["MMSeg fps"] is None and cpu["vs MMSeg fps"] == "not comparable: cpu"
    assert gpu["device"] == "GPU NVIDIA H100 (stated)" and gpu["vs MMSeg fps"] == "same protocol"
    assert gpu["MMSeg fps"] == doc["seg_small_mask", "mmseg", "fps"]
    assert not [k for k in cpu if "train" in k]  # inference memory is not set beside training memory
    assert "reference fps" not in cpu  # no stated GPU or protocol: listed with the documented figures only
    documented = {r["config"]: r for r in report[1]["documented_speed"]}
    assert documented["seg_tiny_mask"]["reference fps"] == doc["seg_tiny_mask", "reference", "fps"]


def test_training_memory_beside_training_memory(store, report, markdown):
    rows = {r["config"]: r for r in report[1]["training_benchmark"]}
    gpu, cpu, doc = rows["seg_small_mask"], rows["seg_tiny_mask"], store.doc
    assert gpu["train peak GB"] == pytest.approx(store.logged["small"]["bench_train/peak_memory_mb"] / 1024)
    assert (gpu["device"], gpu["precision"], gpu["batch"], gpu["crop"]) == ("GPU NVIDIA H100 (stated)", "fp32", "1",
                                                                             "512")
    assert gpu["MMSeg train memory GB"] == doc["seg_small_mask", "mmseg", "train_memory"]
    assert gpu["memory measured as"] == "CUDA allocator peak"
    assert cpu["MMSeg train memory GB"] is None
    assert cpu["vs MMSeg memory"] == "not comparable: cpu, batch 4 (documented 1), size 64 (full 512)"
    assert cpu["step median ms"] == pytest.approx(store.logged["tiny"]["bench_train/step_median_ms"])
    assert md_table(markdown, "Training speed and memory")[0]["config"] == "seg_small_mask"


def test_plot_labels_name_the_data_of_runs_not_on_ade20k_val(report):
    from reports.plots import bar_labels

    miou = pd.DataFrame(report[1]["miou"])
    labels = dict(zip(zip(miou["config"], miou["profile"]), bar_labels(miou)))
    assert labels["seg_tiny_mask", "full"] == "seg_tiny_mask"
    assert labels["seg_tiny_mask", "full-copy"] == "seg_tiny_mask [full-copy]\ngenerated (3 images)"
    assert labels["seg_small_mask", "mine"].endswith("\nADE20K val names, unverified (2000 images)")
    assert labels["seg_base_patch8", ""] == "seg_base_patch8"


def test_kernels_view_uses_the_median(store, report):
    rows = report[1]["kernels"]
    timed = store.timed_rows
    # one row per shape and direction, in the profiler's own kernel names
    assert len(rows) == len({(r["shape"], r["direction"]) for r in timed})
    assert {r["kernel"] for r in rows} == {"attn", "mask"}
    median = {(r["kernel"], r["impl"], r["direction"], r["N"]): r for r in timed if r["stat"] == "median"}
    for r in rows:
        for impl in ("triton", "reference"):
            want = median[r["kernel"], impl, r["direction"], r["N"]]
            assert r[f"{impl} TFLOP/s"] == pytest.approx(want["tflops"])
            assert r[f"{impl} frac peak"] == pytest.approx(want["frac_peak"])


def test_kernel_check_view_shows_what_the_interpreter_check_logged(store, report, markdown):
    rows = report[1]["kernel_check"]
    check = store.check_rows
    key = ("shape", "dtype", "output")
    assert [tuple(r[k] for k in key) for r in rows] == [tuple(r[k] for k in key) for r in check]
    assert [r["max abs error"] for r in rows] == pytest.approx([r["max_abs_err"] for r in check], rel=1e-6)
    assert [r["limit"] for r in rows] == pytest.approx([r["limit"] for r in check])
    assert {r["result"] for r in rows} == {"pass"}
    table = md_table(markdown, "Kernel correctness (Triton interpreter)")
    assert len(table) == len(check) and table[0]["max abs error"] == f"{check[0]['max_abs_err']:.2e}"


def test_curves_view(report):
    (row,) = report[1]["curves"]
    assert row["config"] == "seg_tiny_mask"
    assert (row["last iteration"], row["best val mIoU"], row["best at iteration"]) == (100, 30.0, 100)
    assert row["final loss"] == pytest.approx(3.0)


def test_markdown_cells(store, report, markdown):
    out, _ = report
    rows = by_config(md_table(markdown, MIOU_SS))
    small = rows["seg_small_mask"]
    assert small["segrepro ss"] == f"{store.logged['small']['ss/mIoU']:.2f}"
    assert small["reference ss"] == f"{store.doc['seg_small_mask', 'reference', 'miou_ss']:.2f}"
    assert (small["Δ ss"], small["verdict ss"]) == ("-2.00", "below")
    assert by_config(md_table(markdown, MIOU_MSFLIP))["seg_small_mask"]["verdict ms+flip"] == "above"
    assert small["run"] == store.runs["small"][:8]
    assert by_config(md_table(markdown, MIOU_SS), "smoke")["seg_base_mask"]["Δ ss"] == "–"
    assert by_config(md_table(markdown, "Runs: status, data and provenance"))["seg_base_deit_linear"]["status"] == (
        "failed: CUDA out of memory")
    assert by_config(md_table(markdown, "Inference speed"))["seg_tiny_mask"]["images/s"] == "3.25"
    for name in ("miou", "kernels", "curves"):
        assert f"(plots/{name}.png)" in markdown
        assert (out / "plots" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    # Swapped in as a whole: nothing of the temporary directory is left beside it.
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_a_new_report_replaces_the_old_one_as_a_whole(store, tmp_path):
    out = tmp_path / "report"
    build.build_report(store.uri, out)
    (out / "plots" / "old.png").write_bytes(b"from an older report")
    build.build_report(store.uri, out)
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["curves.png", "kernels.png", "miou.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_an_output_directory_with_other_files_is_refused(store, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(build.ReportError, match="not a report's"):
        build.build_report(store.uri, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    argv = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def test_cli_json(store, report, tmp_path, capsys):
    assert build.run(_args(tracking_uri=store.uri, out=tmp_path / "r", json=True)) == 0
    result = json.loads(capsys.readouterr().out)
    assert by_config(result["miou"])["seg_small_mask"]["verdict ss"] == "below"
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.md", "report.html", "results.csv", "plots"}


def test_cli_default_store_in_run_dir(store, tmp_path, capsys):
    # --run-dir alone: the store is RUN_DIR/mlflow.db and the report goes to RUN_DIR/report.
    assert build.run(_args(run_dir=store.root)) == 0
    text = capsys.readouterr().out
    assert "ss: " in text and "1 below" in text
    assert (store.root / "report" / "report.html").is_file()


@pytest.mark.parametrize("case", ["missing run dir", "no store file", "unreachable server"])
def test_cli_unreadable_store(tmp_path, capsys, case):
    if case == "missing run dir":
        args = _args(run_dir=tmp_path / "nope")
    elif case == "no store file":
        args = _args(run_dir=tmp_path)
    else:
        import socket

        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = _args(tracking_uri=f"http://127.0.0.1:{port}", out=tmp_path / "r")
    assert build.run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segrepro report: error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists()  # reading never creates a store
    assert not (tmp_path / "r").exists()


def test_no_runs_is_a_documented_only_report(store, tmp_path):
    # Partial data is normal: a store without the experiment still gives the documented table.
    result = build.build_report(store.uri, tmp_path, experiment_name="absent")
    assert {r["verdict ss"] for r in result["miou"]} == {"not run", "no configuration"}
    assert result["tables"] == ["Summary", MIOU_SS, MIOU_MSFLIP, "Documented sources",
                                "Documented speed, size and memory"]
    assert result["images"] == ["miou"]
    assert any("absent" in n for n in result["notes"])
    text = (tmp_path / "report.md").read_text()
    assert "No run logged an inference benchmark." in text and "No kernels profile logged" in text
    assert "No run logged a training benchmark" in text and "- data: no runs, documented figures only" in text
    assert "No kernels check logged." in text


@pytest.mark.parametrize("damage", ["random bytes", "empty file", "truncated store"])
def test_report_on_a_damaged_store_is_one_line_and_exit_2(store, tmp_path, capsys, damage):
    from harness import cli

    db = tmp_path / "mlflow.db"
    if damage == "random bytes":
        db.write_bytes(random.Random(0).randbytes(64 * 1024))
    elif damage == "empty file":
        db.touch()
    else:
        whole = (store.root / "mlflow.db").read_bytes()
        db.write_bytes(whole[:len(whole) // 2])
    before = db.read_bytes()
    assert cli.main(["report", "--run-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    (err,) = captured.err.splitlines()  # one line: no SQLAlchemy traceback, no MLflow log lines
    assert err.startswith("segrepro report: error:") and str(db) in err and "not a readable MLflow store" in err
    assert db.read_bytes() == before  # opened read-only: an empty file does not become a store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_a_running_run_whose_process_is_gone_is_not_shown_running(tmp_path):
    import subprocess
    import sys

    from harness.config import load_config
    from harness.contract import PID, RUN_KEY, TRAINING_ID, default_tracking_uri
    from harness.tracking import Tracker

    tracker = Tracker(default_tracking_uri(tmp_path), tmp_path)
    parent = tracker.start_parent(["reproduce"])
    cfg = load_config("seg_tiny_mask", profile="smoke")
    live, _ = tracker.child_run(cfg, parent, {}, {TRAINING_ID: "a", RUN_KEY: "a"})
    dead, _ = tracker.child_run(load_config("seg_small_mask", profile="smoke"), parent, {},
                                {TRAINING_ID: "b", RUN_KEY: "b"})
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    tracker.set_tags(dead, {PID: gone})  # as if its writer had been SIGKILLed before anyone reran it
    status = collect(tracker.uri).runs.set_index("run_id")["status"]
    assert status[live] == "running"
    assert status[dead] == "killed (its process is gone)"
