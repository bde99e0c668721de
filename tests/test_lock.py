"""The run-directory lock with real processes: held while the holder lives, gone when it dies."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from harness.lock import RunDirBusy, RunLock, holder

HOLD = "import sys, time; from harness.lock import RunLock; RunLock(sys.argv[1], 'reproduce').acquire(); " \
       "print('held', flush=True); time.sleep(600)"


def test_a_second_process_is_refused_naming_the_holder_until_it_dies(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        info = holder(tmp_path)
        assert (info["pid"], info["host"], info["command"]) == (proc.pid, socket.gethostname(), "reproduce")
        with pytest.raises(RunDirBusy, match=f"PID {proc.pid} on {socket.gethostname()}"):
            RunLock(tmp_path, "train").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel released it with the process: no stale lock to clean up
    assert holder(tmp_path) is None
    with RunLock(tmp_path, "train"):
        assert holder(tmp_path)["pid"] == os.getpid()
    assert holder(tmp_path) is None


def test_the_lock_is_not_inherited_by_children(tmp_path):
    with RunLock(tmp_path, "reproduce"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        time.sleep(0.1)
        assert holder(tmp_path) is None  # released although the child still runs
    finally:
        child.kill()
        child.wait()


def test_refused_input_leaves_no_run_directory_behind(tmp_path):
    from harness.config import InputError

    with pytest.raises(InputError):
        with RunLock(tmp_path / "new", "reproduce"):
            raise InputError("--data-root x: no such directory")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(InputError):
        with RunLock(tmp_path / "kept", "reproduce"):
            raise InputError("bad")
    assert (tmp_path / "kept").is_dir()  # it was there before
