"""A reproduce run directory read back: each configuration's work directory, its status,
stage, checkpoint and figures (``segrepro runs``); and a run directory given as
``--checkpoint`` resolved to its checkpoint and the data it was trained on (eval, bench,
predict).

A configuration's work directory, ``RUN_DIR/configs/NAME-<training identity>/``
(``harness.reproduce`` writes it):
- ``config.yaml``: the resolved config; ``log.txt``: one timestamped line per event, the last
  one ``finished: ...``, ``failed: ...`` or ``killed: ...`` once the configuration stopped;
- ``train/``: the training run directory (``harness.train.driver``: ``train_result.json`` once
  training finished, its ``checkpoint`` the final ``checkpoint.pth``);
- ``ss_metrics.json``, ``msflip_metrics.json`` (with ``*_per_class.csv``), ``bench.json``: each
  stage's result; ``progress.json``: how far the running evaluation or benchmark is.

Everything here is read from these files: they are there whatever the tracking store (the
run directory's SQLite, a remote server, none left at all), and reading them needs neither
MLflow nor Ray. Whether a process still works on a configuration comes from the run
directory's lock (``harness.lock``), whose holder started after the last line of its log.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.config import InputError
from harness.progress import PROGRESS_FILE, read_progress

CONFIGS_DIR = "configs"
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.txt"
TRAIN_DIR = "train"
BENCH_FILE = "bench.json"
MODES = ("ss", "msflip")
STAGE_NAMES = {"train": "train", "ss": "eval ss", "msflip": "eval ms+flip", "bench": "bench"}
# harness.train.driver's names, repeated so that listing a run directory imports no torch
_TRAIN_RESULT, _RAY_DIR = "train_result.json", "ray"


def metrics_file(mode: str) -> str:
    """The result file of the ``ss`` or ``msflip`` evaluation (``evaluate.write_result``'s name)."""
    return f"{mode}_metrics.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_note(work: Path) -> tuple[str | None, str]:
    """(time, text) of the last line of the configuration's log; (None, "") without one."""
    try:
        lines = [line for line in (work / LOG_FILE).read_text().splitlines() if line[:4].isdigit()]
    except OSError:
        return None, ""
    if not lines:
        return None, ""
    return lines[-1][:19], lines[-1][20:]


def _partial_checkpoint(train_dir: Path) -> tuple[Path, int] | None:
    """(checkpoint.pth, iteration) of the newest usable checkpoint of an unfinished training."""
    from harness.train.checkpoint import MODEL_FILE, newest
    from harness.train.driver import checkpoint_dirs

    saved = newest(checkpoint_dirs(train_dir))
    return (saved.path / MODEL_FILE, saved.iteration) if saved else None


def describe(work: Path, holder: dict | None = None) -> dict:
    """One configuration's work directory: its status, stage, checkpoint, figures and files.
    ``holder``: who holds the run directory now (``harness.lock.holder``), if anyone.

    Status: ``finished``; ``running`` (the live holder of the run directory started after the
    log's last line, which is not a final one); ``failed`` / ``killed`` (the log says so);
    ``stopped`` (the process ended without a word: killed outright; ``reproduce`` resumes it).
    Stage: the first one without a result (train, eval ss, eval ms+flip, bench), or done."""
    cfg = {}
    if (work / CONFIG_FILE).is_file():
        cfg = yaml.safe_load((work / CONFIG_FILE).read_text()) or {}
    name = cfg.get("name") or work.name.rsplit("-", 1)[0]
    train = _read_json(work / TRAIN_DIR / _TRAIN_RESULT)
    results = {mode: _read_json(work / metrics_file(mode)) for mode in MODES}
    bench = _read_json(work / BENCH_FILE)
    total = (cfg.get("optim") or {}).get("iterations")
    if train and Path(train.get("checkpoint", "")).is_file():
        checkpoint, iteration = train["checkpoint"], train.get("iterations")
    else:
        train = None
        partial = _partial_checkpoint(work / TRAIN_DIR) if (work / TRAIN_DIR / _RAY_DIR).is_dir() else None
        checkpoint, iteration = (str(partial[0]), partial[1]) if partial else (None, 0)
    stage = next((key for key, done in (("train", train), ("ss", results["ss"]), ("msflip", results["msflip"]),
                                        ("bench", bench)) if not done), None)
    when, note = _last_note(work)
    final = note.split(":", 1)[0] if note.startswith(("finished:", "failed:", "killed:")) else None
    if final == "finished" and stage is None:
        status = "finished"
    elif holder and not final and when is not None and holder.get("since", "") <= when:
        status = "running"
    else:
        status = final if final in ("failed", "killed") else "stopped"
    progress = None
    if status == "running" and stage:
        if stage == "train":
            progress = {"done": iteration, "total": total, "unit": "it"}
        else:
            record = read_progress(work / PROGRESS_FILE)
            if record and str(record.get("token", "")).startswith(STAGE_NAMES[stage] + " "):
                progress = {k: record[k] for k in ("done", "total", "unit")}
    return {
        "config": name, "id": work.name[len(name) + 1:], "recipe": cfg.get("recipe"), "profile": cfg.get("profile"),
        "status": status, "stage": STAGE_NAMES[stage] if stage else "done", "progress": progress,
        "note": note, "work_dir": str(work), "checkpoint": checkpoint, "iteration": iteration, "iterations": total,
        "ss_mIoU": results["ss"]["mIoU"] if results["ss"] else None,
        "msflip_mIoU": results["msflip"]["mIoU"] if results["msflip"] else None,
        # bench.json: {"inference": ..., "train": ...}; before the training benchmark, inference only
        "images_per_s": (bench.get("inference") or bench).get("images_per_s") if bench else None,
        "train_images_per_s": (bench.get("train") or {}).get("images_per_s") if bench else None,
        "data_root": train.get("data_root") if train else None,
        "files": {key: str(path) for key, path in (("ss", work / metrics_file("ss")),
                                                   ("msflip", work / metrics_file("msflip")),
                                                   ("bench", work / BENCH_FILE), ("log", work / LOG_FILE))
                  if path.is_file()},
    }


def list_runs(run_dir: str | os.PathLike) -> tuple[list[dict], dict | None]:
    """(every configuration's ``describe``, by name then directory; the run directory's live
    holder or None)."""
    from harness.lock import holder

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"--run-dir {run_dir}: no such directory (segrepro reproduce --run-dir writes one)")
    live = holder(run_dir)
    works = sorted(p for p in (run_dir / CONFIGS_DIR).glob("*-*") if p.is_dir())
    return [describe(w, live) for w in works], live


def _figure(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _stage(row: dict) -> str:
    p = row["progress"]
    if row["status"] == "running" and p and p.get("total"):
        return f"{row['stage']} {p['done']}/{p['total']} {p['unit']}"
    if row["stage"] == "train" and row["iterations"]:
        return f"train ({row['iteration']}/{row['iterations']} saved)"
    return row["stage"]


def format_runs(run_dir: str | os.PathLike, rows: list[dict], live: dict | None) -> str:
    from tabulate import tabulate

    from harness.lock import describe as describe_holder

    head = f"{run_dir}: " + (f"held by {describe_holder(live)}" if live else "no process holds it")
    if not rows:
        return f"{head}\nno configuration has started here yet"
    table = [[r["config"], r["id"], r["profile"] or "?", r["recipe"] or "?", r["status"], _stage(r),
              _figure(r["ss_mIoU"]), _figure(r["msflip_mIoU"]), _figure(r["images_per_s"])] for r in rows]
    lines = [head, tabulate(table, headers=["config", "id", "profile", "recipe", "status", "stage", "ss mIoU",
                                            "ms+flip mIoU", "img/s"], disable_numparse=True), ""]
    for r in rows:
        lines.append(f"{r['config']}-{r['id']}:")
        lines.append(f"  run dir     {r['work_dir']}")
        lines.append(f"  checkpoint  {r['checkpoint'] or 'none yet'}"
                     + ("" if r["stage"] != "train" or not r["checkpoint"] else " (training not finished)"))
        if r["status"] in ("failed", "killed"):
            lines.append(f"  {r['note']}")
    lines.append("eval, bench and predict take a run dir as --checkpoint (its config, profile, recipe and data)")
    return "\n".join(lines)


def cmd_runs(args) -> int:
    rows, live = list_runs(args.run_dir)
    if args.json:
        print(json.dumps({"run_dir": str(args.run_dir), "holder": live, "configs": rows}, indent=2))
    else:
        print(format_runs(args.run_dir, rows, live))
    return 0


@dataclass(frozen=True)
class RunCheckpoint:
    """A training run's checkpoint named by its run directory (or a checkpoint inside one)."""

    checkpoint: Path
    train_dir: Path
    work: Path | None  # the configuration's work directory, under reproduce
    data_root: str | None  # what it was trained on (known once training finished)
    finished: bool  # the finished training's final checkpoint

    def describe(self) -> str:
        where = self.work or self.train_dir
        return f"{where}: {'final' if self.finished else 'newest (training not finished)'} checkpoint {self.checkpoint}"


def _train_dir_of(path: Path) -> Path | None:
    if path.is_dir():
        for d in (path / TRAIN_DIR, path):
            if (d / _RAY_DIR).is_dir() or (d / _TRAIN_RESULT).is_file():
                return d
    for parent in path.parents:  # a checkpoint (file or directory) inside TRAIN_DIR/ray/attempt-N/
        if parent.name == _RAY_DIR and parent.parent != parent:
            return parent.parent
    return None


def run_checkpoint(path: str | os.PathLike) -> RunCheckpoint | None:
    """``path`` resolved when it is a configuration's work directory (``RUN/configs/NAME-ID``), a
    ``segrepro train`` run directory, or a checkpoint inside either: the final checkpoint of a
    finished training, else the newest usable one (a training run directory given as such), or
    ``path`` itself when it names one. None: ``path`` is no run directory of segrepro's (a
    reference, MMSeg or PaddleViT checkpoint)."""
    path = Path(path).resolve()
    train_dir = _train_dir_of(path)
    if train_dir is None:
        return None
    result = _read_json(train_dir / _TRAIN_RESULT) or {}
    final = Path(result["checkpoint"]) if Path(result.get("checkpoint", "")).is_file() else None
    if path.is_file() or path.parent.parent.name == _RAY_DIR:  # a checkpoint, or its directory
        from harness.train.checkpoint import MODEL_FILE

        checkpoint = path if path.is_file() else path / MODEL_FILE
    elif final is not None:
        checkpoint = final
    else:
        partial = _partial_checkpoint(train_dir)
        if partial is None:
            raise InputError(f"--checkpoint {path}: a training run directory with no usable checkpoint yet")
        checkpoint = partial[0]
    work = train_dir.parent if train_dir.name == TRAIN_DIR and (train_dir.parent / CONFIG_FILE).is_file() else None
    return RunCheckpoint(checkpoint, train_dir, work, result.get("data_root") if final else None,
                         final is not None and checkpoint.resolve() == final.resolve())
