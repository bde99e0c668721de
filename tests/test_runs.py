"""The status board (on a terminal and off it), stage progress files, and a run directory read
back (``segrepro runs``, ``--checkpoint RUN/configs/NAME-ID``). The end-to-end checks on a real
reproduce run are in tests/test_reproduce.py."""
import io
import json
import logging
import os
import re
import shutil
import sys

import pytest
import yaml

from harness.config import InputError
from harness.progress import ProgressFile, format_duration
from harness.reproduce import StatusBoard
from harness.runs import describe, list_runs, run_checkpoint


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows after ``text``: the control sequences the board writes (cursor up
    N lines, clear line, clear to the end of the screen) applied."""
    lines, row, col = [""], 0, 0
    for tok in re.split(r"(\x1b\[[0-9;]*[A-Za-z]|\r|\n)", text):
        if tok == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif tok == "\r":
            col = 0
        elif tok.startswith("\x1b["):
            n = int(tok[2:-1] or 1)
            if tok[-1] == "F":
                row, col = max(row - n, 0), 0
            elif tok[-1] == "J":
                lines[row] = lines[row][:col]
                del lines[row + 1:]
            elif tok[-1] == "K":
                lines[row] = ""
        elif tok:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + tok + line[col + len(tok):]
            col += len(tok)
    return lines[:-1] if lines[-1] == "" else lines


def test_text_written_while_the_board_is_up_goes_above_it(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *a: os.terminal_size((60, 24)))
    log = logging.getLogger("segrepro-test-board")
    handler = logging.StreamHandler(term)  # made before the board, as library loggers are
    log.addHandler(handler)
    try:
        board = StatusBoard(["seg_a", "seg_b"])
        with board:
            board.update("seg_a", "started; " + "x" * 100)  # wider than the terminal
            board.start("seg_b", "eval ss", "starting")
            print("Warning: the first line\n  and its second line", file=sys.stderr)
            sys.stderr.write("a line written ")
            sys.stderr.write("in two parts\n")
            log.warning("a logged warning\n  over two lines")
            board.progress("seg_b", 3, 10, "img")
        assert handler.stream is term and sys.stderr is term
    finally:
        log.removeHandler(handler)
    shown = screen(term.getvalue())
    assert shown[:5] == ["Warning: the first line", "  and its second line", "a line written in two parts",
                         "a logged warning", "  over two lines"], shown
    assert [line.split()[0] for line in shown[5:]] == ["seg_a", "seg_b"], shown
    assert all(len(line) < 60 for line in shown), shown
    assert "eval ss 3/10 img" in shown[6]


def test_eta_counts_from_the_stage_start():
    board = StatusBoard(["seg_a"], stream=io.StringIO())
    board.start("seg_a", "train", base=20)  # resumed at iteration 20
    board.rows["seg_a"].since -= 30  # 30 s ago, start-up included
    board.progress("seg_a", 30, 120, "it")
    assert f"eta {format_duration(30 / (30 - 20) * (120 - 30))}" in board.line("seg_a")


def test_off_a_terminal_stages_print_at_once_and_progress_now_and_then():
    out = io.StringIO()
    board = StatusBoard(["seg_a"], stream=out)
    board.start("seg_a", "eval ss")
    for done in range(1, 101):
        board.progress("seg_a", done, 100, "img")
    board.update("seg_a", "finished")
    lines = out.getvalue().splitlines()
    assert [line.split("  ")[1] for line in lines] == ["eval ss", "eval ss 1/100 img", "eval ss 100/100 img",
                                                       "finished"], lines


def test_the_board_reads_its_stage_progress_file_only(tmp_path):
    path = tmp_path / "progress.json"
    board = StatusBoard(["seg_a"], stream=io.StringIO())
    ProgressFile(path, "eval ss 1", "img")(5, 10)
    board.start("seg_a", "eval ss", progress=(path, "eval ss 1"))
    board.poll()
    assert "eval ss 5/10 img" in board.line("seg_a")
    ProgressFile(path, "eval ss 0", "img")(9, 10)  # a late write of an earlier stage
    board.poll()
    assert "eval ss 5/10 img" in board.line("seg_a")


def _work(root, name="seg_a", log=(), results=(), checkpoint=True):
    """A configuration's work directory as reproduce leaves it, with empty stand-ins for files
    that are only listed, never read."""
    work = root / "configs" / f"{name}-0123abcd"
    (work / "train").mkdir(parents=True)
    (work / "config.yaml").write_text(yaml.safe_dump({"name": name, "profile": "smoke", "recipe": "reference",
                                                      "optim": {"iterations": 60}}))
    (work / "log.txt").write_text("".join(f"2026-01-01 10:00:0{i} {line}\n" for i, line in enumerate(log)))
    if checkpoint:
        ckpt = work / "train" / "ray" / "attempt-001" / "checkpoint_000001" / "checkpoint.pth"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"")
        (work / "train" / "train_result.json").write_text(json.dumps({"checkpoint": str(ckpt), "iterations": 60,
                                                                      "data_root": str(root / "data")}))
    for mode, figure in results:
        (work / {"bench": "bench.json"}.get(mode, f"{mode}_metrics.json")).write_text(json.dumps(figure))
    return work


def test_each_status_is_read_from_the_work_directory(tmp_path):
    done = [("ss", {"mIoU": 41.5}), ("msflip", {"mIoU": 43.25}),
            ("bench", {"inference": {"images_per_s": 7.5}, "train": {"images_per_s": 0.5}})]
    finished = describe(_work(tmp_path / "a", log=["started", "finished: ss mIoU 41.50"], results=done))
    assert (finished["status"], finished["stage"], finished["ss_mIoU"], finished["msflip_mIoU"],
            finished["images_per_s"], finished["train_images_per_s"], finished["profile"]) == (
        "finished", "done", 41.5, 43.25, 7.5, 0.5, "smoke")
    failed = describe(_work(tmp_path / "b", log=["started", "failed: RuntimeError: boom"], results=done[:1]))
    assert (failed["status"], failed["stage"], failed["note"]) == ("failed", "eval ms+flip",
                                                                   "failed: RuntimeError: boom")
    work = _work(tmp_path / "c", log=["started", "eval ss: starting"])
    assert describe(work)["status"] == "stopped"  # its process died without a word
    assert describe(work, {"since": "2026-01-01 09:00:00"})["status"] == "running"
    assert describe(work, {"since": "2026-01-01 11:00:00"})["status"] == "stopped"  # the holder came later
    ProgressFile(work / "progress.json", "eval ss 1.0", "img")(7, 9)
    assert describe(work, {"since": "2026-01-01 09:00:00"})["progress"] == {"done": 7, "total": 9, "unit": "img"}
    killed = describe(_work(tmp_path / "d", log=["started", "killed: interrupted"], checkpoint=False))
    assert (killed["status"], killed["stage"], killed["checkpoint"]) == ("killed", "train", None)
    rows, holder = list_runs(tmp_path / "a")
    assert [r["config"] for r in rows] == ["seg_a"] and holder is None
    with pytest.raises(InputError, match="no such directory"):
        list_runs(tmp_path / "missing")


def test_a_run_directory_names_its_checkpoint_and_data(tmp_path):
    work = _work(tmp_path, log=["started"])
    result = json.loads((work / "train" / "train_result.json").read_text())
    for given in (work, work / "train", result["checkpoint"]):
        found = run_checkpoint(given)
        assert (str(found.checkpoint), found.work, found.data_root, found.finished) == (
            result["checkpoint"], work, result["data_root"], True), given
    assert run_checkpoint(tmp_path) is None  # not a run directory: read as a checkpoint of a source
    empty = tmp_path / "train-run"
    (empty / "ray").mkdir(parents=True)
    with pytest.raises(InputError, match="no usable checkpoint"):
        run_checkpoint(empty)
