import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def script_env(tmp_path: Path | None = None, **overrides: str) -> dict:
    """The environment a user's shell would give a script, minus any cotune settings of the developer's."""
    from cotune.settings import FIELDS, env_name

    env = {k: v for k, v in os.environ.items() if k.lower() not in FIELDS and k != "COTUNE_MAKE_VARS"}
    env["COTUNE_ENV_FILE"] = str((tmp_path or ROOT) / "no-such.env")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def run_script(name: str, *args: str, env: dict | None = None, check: bool = False, timeout: int = 900,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args], capture_output=True, text=True,
                          env=env or script_env(), timeout=timeout, cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, no traceback, and a clean `error:` line carrying every fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    text = "\n".join(error_lines(proc))
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
