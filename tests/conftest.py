import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
# the demo preset, plus the F16 and Q4_K_M files it no longer asks for (to keep `make demo` short), so that the tests
# go through the extras' conversion, quantization, fidelity figures, verify and push
DEMO = ("--preset", "demo", "--gguf-quants", "Q8_0,F16,Q4_K_M")
PLANTED_TOKEN = "hf_" + "PlantedTokenThatMustNeverLeak0123456789"

# Under `make test` the suite runs on two workers (pytest-xdist), each on its share of the cores: torch's thread
# pool in two processes, each as wide as the machine, would oversubscribe it. The stage scripts the tests start
# inherit the setting. A setting of the caller's is kept.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    from cotune.cpu import usable_cores

    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# One worker runs all the tests of a group, so that a fixture wider than a test is built once: the files whose tests
# read the session's demo run form one group, every other file is a group of its own. A new file that reads it
# belongs in DEMO_FILES (collection says so).
DEMO_FILES = ("test_export_fast.py", "test_pipeline.py", "test_push.py", "test_reliability.py")
# The groups that take longest, first, so that the workers finish together (from `--durations` on a 2-core
# machine); the rest follow in the order pytest collects them.
HEAVY_GROUPS = ("demo", "test_docker.py", "test_ddp.py", "test_hub_download.py", "test_cpu.py")


def group_of(nodeid: str) -> str:
    file = nodeid.split("::", 1)[0].rpartition("/")[2]
    return "demo" if file in DEMO_FILES else file


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: the hook is xdist's
def pytest_xdist_make_scheduler(config, log):
    """Whatever `--dist` asks (`-n 2` alone means `load`), xdist's loadscope scheduling with group_of() as the
    scope and the heavy groups first: handed out test by test, the demo run and the image would be built on every
    worker. (xdist_group marks with `--dist loadgroup` would say the same, but pytest-xdist 3.8 writes the group into
    a node attribute that pytest 9 no longer reads.) `--dist each` runs everything everywhere, as asked."""
    if config.getvalue("dist") == "each":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # the order collection gives: HEAVY_GROUPS first

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "demo_run" in item.fixturenames and group_of(item.nodeid) != "demo":
            raise pytest.UsageError(f"{item.nodeid} reads demo_run: add its file to DEMO_FILES in tests/conftest.py, "
                                    "so that the demo run is built once per session under `make test`'s workers")
    rank = {group: i for i, group in enumerate(HEAVY_GROUPS)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(rank)))  # stable: the rest keep their order


def script_env(tmp_path: Path | None = None, **overrides: str) -> dict:
    """The environment a user's shell would give a script, minus any cotune settings of the developer's."""
    from cotune.settings import FIELDS

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


def unavailable(reason: str):
    """A test that needs what this machine lacks skips and says why; in CI (CI=true) it fails instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, no traceback, and a clean `error:` line carrying every fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    text = "\n".join(error_lines(proc))
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def train_killed_then_resumed(run: Path, env: dict) -> tuple[str, int]:
    """Start training, SIGKILL it after the step-8 checkpoint is safely on disk, then rerun it."""
    args = [sys.executable, str(SCRIPTS / "train.py"), *DEMO, "--run-dir", str(run)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    metrics = run / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [json.loads(l).get("step", 0) for l in metrics.read_text().splitlines()] if metrics.is_file() else []
        if steps and max(steps) >= 10:
            proc.send_signal(signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.5)
    proc.wait()
    assert killed_at is not None, "training ended before it could be killed"
    assert not (run / "train" / "adapter").exists() and not (run / "train" / "run.json").exists()
    resumed = run_script("train", *DEMO, "--run-dir", str(run), env=env, check=True)
    return resumed.stdout + resumed.stderr, killed_at


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The whole demo chain once per session, with a token planted in the environment (it must leak nowhere)."""
    run = tmp_path_factory.mktemp("demo") / "run"
    env = script_env(run.parent, HF_TOKEN=PLANTED_TOKEN)
    out = {"run": run, "env": env, "outputs": []}
    for stage in (("data",), ("ask", "baseline")):
        out["outputs"].append(run_script(stage[0], *stage[1:], *DEMO, "--run-dir", str(run), env=env, check=True))
    out["train_log"], out["killed_at"] = train_killed_then_resumed(run, env)
    out["outputs"].append(run_script("ask", "after", *DEMO, "--run-dir", str(run), env=env, check=True))
    # DEMO asks Q8_0, F16 and Q4_K_M
    out["outputs"].append(run_script("export", *DEMO, "--run-dir", str(run), env=env, check=True))
    out["verify"] = run_script("verify", *DEMO, "--run-dir", str(run), env=env)
    out["report"] = run_script("report", *DEMO, "--run-dir", str(run), env=env)
    out["outputs"] += [out["verify"], out["report"]]
    return out


