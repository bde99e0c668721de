"""Start-up: listing the commands and the zoo must not import the heavy libraries (a fresh
interpreter is the point here, so these run in a subprocess)."""
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "ray", "mlflow", "pandas", "matplotlib", "triton")
PROBE = """
import contextlib, io, json, sys
from harness.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main({argv!r})
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


@pytest.mark.parametrize("argv", [["--help"], ["zoo"], ["zoo", "--json"], ["eval", "--help"]])
def test_listing_commands_imports_no_heavy_library(argv):
    code = PROBE.format(argv=argv, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == []


def test_the_chosen_command_gets_its_arguments(segrepro):
    # the lazily built parser still knows every command's arguments once it is chosen
    assert "--data-root DATA_ROOT" in segrepro("reproduce", "--help").stdout
    assert "--backbone-dir" in segrepro("weights", "check", "--help").stdout
    bad = segrepro("zoo", "--no-such-flag")
    assert bad.returncode == 2 and "--no-such-flag" in bad.stderr
