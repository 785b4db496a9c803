"""Every stage script answers --help at once (heavy imports live inside main)."""
import subprocess
import sys
import time

import pytest

from conftest import SCRIPTS, script_env

STAGES = sorted(p.stem for p in SCRIPTS.glob("*.py"))


def test_the_stage_scripts_are_there():
    assert {"data", "ask", "train", "export", "verify", "settings"} <= set(STAGES)


@pytest.mark.parametrize("name", STAGES)
def test_help_is_fast_and_imports_nothing_heavy(name):
    code = (f"import runpy, sys; sys.argv = ['{name}', '--help']\n"
            f"try:\n    runpy.run_path('{SCRIPTS / name}.py', run_name='__main__')\nexcept SystemExit as e:\n"
            f"    assert e.code in (0, None), e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'llama_cpp') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env())
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    assert time.monotonic() - start < 5
