"""Every stage script answers --help at once (heavy imports live inside main)."""
import subprocess
import sys

import pytest

from conftest import SCRIPTS, assert_user_error, run_script, script_env

STAGES = sorted(p.stem for p in SCRIPTS.glob("*.py"))


def test_the_stage_scripts_are_there():
    assert {"data", "ask", "train", "export", "verify", "settings"} <= set(STAGES)


@pytest.mark.parametrize("name", STAGES)
def test_help_imports_nothing_heavy(name):
    """--help answers without torch and the rest: that, not a wall-clock bound on a busy machine, is what keeps it
    fast."""
    code = (f"import runpy, sys; sys.argv = ['{name}', '--help']\n"
            f"try:\n    runpy.run_path('{SCRIPTS / name}.py', run_name='__main__')\nexcept SystemExit as e:\n"
            f"    assert e.code in (0, None), e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'llama_cpp') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env())
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("offline, fragment", [
    ("1", "not in the Hugging Face cache"),  # HF_HUB_OFFLINE=1: never tries the network
    ("0", "the Hub is unreachable"),  # online setting, but the Hub can't be reached (a closed local port)
])
def test_a_hub_model_that_cannot_be_had_is_one_line(tmp_path, offline, fragment):
    env = script_env(tmp_path, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE=offline,
                     HF_ENDPOINT="http://127.0.0.1:9", NO_PROXY="127.0.0.1")
    proc = run_script("ask", "baseline", "--run-dir", str(tmp_path / "run"), "--base-model", "nobody/no-such-model",
                      env=env, timeout=300)
    assert_user_error(proc, "BASE_MODEL='nobody/no-such-model'", fragment, "give a local folder")
    assert not (tmp_path / "run" / "baseline" / "answers.json").exists()
