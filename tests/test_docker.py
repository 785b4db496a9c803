"""The container, built and run for real: the cpu flavor of the repository's own Dockerfile, built on a real Docker
engine, runs every stage of the demo (data to report) in containers, as a non-root host user, through the Makefile
a user types. A training container killed mid-run leaves nothing done and the next run resumes; the GGUF made in
the container passes verify on the host; the image and the run hold no secret planted in `.env`.

Needs a Docker engine (started here when this is root and dockerd is installed; `make test` installs docker.io and
debootstrap where it can). Elsewhere these tests skip and say why; in CI they must run."""
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import PLANTED_TOKEN, ROOT, script_env, unavailable

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE = "cotune:test-cpu"
BASE_IMAGE = "cotune-base/debian:bookworm"
LLAMA_CPP_PYTHON = "0.3.36"


def docker_client() -> str:
    """A client that builds with BuildKit: DOCKER if set, else Debian's (a 28.x client without buildx refuses)."""
    for candidate in (os.environ.get("DOCKER"), "/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).is_file():
            return candidate
    unavailable("no docker client installed (apt-get install docker.io)")


def run(*args, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))[:300]} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def docker():
    client = docker_client()
    if run(client, "info", check=False).returncode != 0:
        dockerd = shutil.which("dockerd")
        if os.geteuid() != 0 or dockerd is None:
            unavailable("no Docker engine answers and none can be started here (needs root and docker.io)")
        log = open("/tmp/cotune-dockerd.log", "ab")
        subprocess.Popen([dockerd], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while run(client, "info", check=False).returncode != 0:
            if time.monotonic() > deadline:
                unavailable("dockerd did not answer within 60 s (see /tmp/cotune-dockerd.log)")
            time.sleep(1)
    return client


def user_for_the_run():
    """A non-root user to run make as, so that 'outputs belong to the caller' means something. As root: a user
    made for the test, in the docker group; otherwise the caller."""
    if os.geteuid() != 0:
        return None, os.getuid()
    name = "cotune-ci"
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        run("useradd", "--create-home", "--uid", "4242", name)
        uid = 4242
    try:
        grp.getgrnam("docker")
        run("usermod", "-aG", "docker", name)
    except KeyError:
        pass
    return name, uid


def wheelhouse(folder: Path) -> Path:
    """This site's wheels, offered to the build as a wheelhouse: what pip's find-links holds (the CPU torch wheel
    here) and the llama-cpp-python wheel `make setup` built (taken from pip's wheel cache, not rebuilt)."""
    folder.mkdir(parents=True, exist_ok=True)
    links = run(sys.executable, "-m", "pip", "config", "get", "global.find-links", check=False).stdout.split()
    for link in links:
        for wheel in Path(link.removeprefix("file://")).glob("torch-2.13.0*cp311*.whl"):
            shutil.copy(wheel, folder)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", folder, f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        env={**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=off"}, timeout=1800)
    return folder


def ca_bundle() -> str | None:
    for candidate in (os.environ.get("PIP_CERT"),
                      run(sys.executable, "-m", "pip", "config", "get", "global.cert", check=False).stdout.strip(),
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def project_copy(dest: Path) -> Path:
    """The working tree as a fresh clone would have it (tracked and new files, nothing ignored): no .venv."""
    files = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="session")
def built(docker):
    """The cpu image built by `make image` from a copy of the project whose .env holds a token."""
    if run(docker, "image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            unavailable(f"no base image {BASE_IMAGE} and no way to make one (needs root and debootstrap)")
        run("bash", ROOT / "docker" / "debian-base.sh", BASE_IMAGE, env={**os.environ, "DOCKER": docker}, timeout=900)
    # not under pytest's own folder, which only root may enter: the run's user must reach it
    tmp = Path(tempfile.mkdtemp(prefix="cotune-docker-"))
    tmp.chmod(0o755)
    project = project_copy(tmp / "project")
    (project / ".env").write_text(f"HF_TOKEN={PLANTED_TOKEN}\n")
    wheels = wheelhouse(tmp / "wheels")
    args = ["make", "-C", project, "image", "FLAVOR=cpu", f"IMAGE={IMAGE}", f"DEBIAN_IMAGE={BASE_IMAGE}",
            f"WHEELS={wheels}", "TORCH_INDEX=none", f"DOCKER={docker}"]
    if ca_bundle():
        args.append(f"CA_BUNDLE={ca_bundle()}")
    started = time.monotonic()
    build = run(*args, env=script_env(tmp), timeout=3600)
    print(f"make image FLAVOR=cpu: {time.monotonic() - started:.0f} s; {build.stdout.splitlines()[-1]}")
    return {"project": project, "tmp": tmp, "docker": docker, "build": build}


@pytest.fixture(scope="session")
def demo_in_docker(built):
    """As a non-root user, with no .venv: `make train` killed in its container after a checkpoint, then
    `make demo RUN_IN=docker` (every stage in containers; training resumes)."""
    project, docker = built["project"], built["docker"]
    user, uid = user_for_the_run()
    if user:
        run("chown", "-R", f"{uid}:{uid}", built["tmp"])
    as_user = ["runuser", "-u", user, "--"] if user else []
    hf_home = built["tmp"] / "hf-home"
    env = script_env(built["tmp"], HF_HOME=str(hf_home), HOME=str(built["tmp"]))
    env.pop("COTUNE_ENV_FILE")  # the project's own .env (with the planted token) is read, as a user's would be
    make = [*as_user, "make", "-C", str(project), "RUN_IN=docker", "FLAVOR=cpu", f"IMAGE={IMAGE}", f"DOCKER={docker}"]
    run_dir = project / "artifacts" / "demo"

    # 1. make train in a container, killed (the container, not make) once the step-8 checkpoint is on disk
    train = subprocess.Popen([*make, "train", "PRESET=demo", "RUN_DIR=artifacts/demo"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    metrics, killed_at, deadline = run_dir / "train" / "metrics.jsonl", None, time.monotonic() + 1200
    while killed_at is None and train.poll() is None and time.monotonic() < deadline:
        steps = [json.loads(l).get("step", 0) for l in metrics.read_text().splitlines()] if metrics.is_file() else []
        if steps and max(steps) >= 10:
            containers = run(docker, "ps", "-q", "--filter", "label=cotune.stage=train").stdout.split()
            assert len(containers) == 1, containers
            run(docker, "kill", containers[0])
            killed_at = max(steps)
        time.sleep(0.5)
    killed_log = train.communicate(timeout=120)[0]
    assert killed_at is not None, f"training ended before it could be killed:\n{killed_log[-3000:]}"
    assert train.returncode != 0, killed_log[-2000:]
    killed = {"adapter": (run_dir / "train" / "adapter").exists(), "run.json": (run_dir / "train" / "run.json").exists()}

    # 2. the whole demo in containers, resuming training
    started = time.monotonic()
    demo = run(*make, "demo", env=env, timeout=3600)
    seconds = time.monotonic() - started
    print(f"make demo RUN_IN=docker (training resumed): {seconds:.0f} s")
    return {**built, "run": run_dir, "uid": uid, "make": make, "env": env, "killed": killed, "killed_at": killed_at,
            "demo": demo, "killed_log": killed_log}


def test_image_is_two_stage_and_carries_no_compiler_or_build_tree(built):
    docker = built["docker"]
    probe = run(docker, "run", "--rm", "--entrypoint", "bash", IMAGE, "-c",
                "command -v gcc cc cmake c++ || true; ls /opt /root 2>/dev/null; id -un; "
                "python -c 'import llama_cpp, torch; print(torch.__version__)'").stdout
    assert "cmake" not in probe and "/gcc" not in probe, probe
    assert "build" not in probe.split() and "cotune" in probe.splitlines(), probe  # /opt: cotune, venv; user cotune
    assert "+cpu" in probe, probe  # the CPU torch build, not the multi-GB CUDA one


def test_cpu_flavor_runs_without_a_gpu_and_says_its_flavor(built):
    proc = run(built["docker"], "run", "--rm", IMAGE, "python", "/opt/cotune/scripts/verify.py", "--help")
    assert "usage" in proc.stdout.lower()
    label = run(built["docker"], "image", "inspect", "-f", '{{ index .Config.Labels "cotune.flavor" }}', IMAGE).stdout
    assert label.strip() == "cpu"


def test_every_demo_stage_ran_in_a_container_and_the_report_exists(demo_in_docker):
    log = demo_in_docker["demo"].stdout
    assert "stages run on the docker (RUN_IN=docker)" in log
    assert ".venv/bin/python" not in log
    assert "warning: undefined variable" not in log + demo_in_docker["killed_log"]
    # the killed `make train` ran the data stage (and began training); the demo ran the rest
    assert "--label cotune.stage=data " in demo_in_docker["killed_log"]
    for stage in ("baseline", "train", "after", "export", "verify", "report"):
        assert f"--label cotune.stage={stage} " in log, stage
    run_dir = demo_in_docker["run"]
    assert (run_dir / "report" / "report.html").stat().st_size > 1000
    assert json.loads((run_dir / "verify" / "report.json").read_text())["passed"] is True


def test_killed_training_container_left_nothing_done_and_the_rerun_resumed(demo_in_docker):
    assert demo_in_docker["killed"] == {"adapter": False, "run.json": False}
    log = demo_in_docker["demo"].stdout
    assert "resum" in log.lower() and "checkpoint-8" in log, log[-3000:]
    steps = [json.loads(l)["step"] for l in (demo_in_docker["run"] / "train" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert max(steps) == 24


def test_outputs_belong_to_the_caller(demo_in_docker):
    owners = {p.stat().st_uid for p in demo_in_docker["run"].rglob("*")}
    assert owners == {demo_in_docker["uid"]}, owners


def test_the_gguf_made_in_the_container_passes_verify_on_the_host(demo_in_docker, tmp_path):
    gguf = next((demo_in_docker["run"] / "export").glob("*-Q8_0.gguf"))
    proc = subprocess.run(["make", "verify", f"GGUF={gguf}", "RUN_IN=host", f"RUN_DIR={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=ROOT, env=script_env(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stages run on the host" in proc.stdout


def test_verify_of_a_file_in_docker_needs_no_venv(demo_in_docker, tmp_path):
    project = demo_in_docker["project"]
    assert not (project / ".venv").exists()
    gguf = next((demo_in_docker["run"] / "export").glob("*-Q8_0.gguf"))
    proc = run(*demo_in_docker["make"], "verify", f"GGUF={gguf}", env=demo_in_docker["env"], timeout=900)
    assert "--gguf" in proc.stdout and "verify" in proc.stdout


def test_no_secret_in_the_image_or_the_run(demo_in_docker):
    docker = demo_in_docker["docker"]
    history = run(docker, "history", "--no-trunc", IMAGE).stdout
    assert PLANTED_TOKEN not in history
    container = run(docker, "create", IMAGE).stdout.strip()
    try:
        export = subprocess.run(f"{docker} export {container} | grep -a -c {PLANTED_TOKEN} || true", shell=True,
                                capture_output=True, text=True, timeout=600)
        assert export.stdout.strip() == "0", "the planted token is in the image's filesystem"
    finally:
        run(docker, "rm", container, check=False)
    leaked = [p for p in demo_in_docker["run"].rglob("*") if p.is_file() and PLANTED_TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert PLANTED_TOKEN not in demo_in_docker["demo"].stdout + demo_in_docker["demo"].stderr


def test_training_on_two_processes_runs_in_one_container(demo_in_docker):
    """`make train NPROC_PER_NODE=2 RUN_IN=docker`: torchrun inside the one training container (shared memory through
    --ipc=host), two gloo processes, one set of outputs written by rank 0. GRAD_ACCUM=2: the demo's one sequence per
    step becomes two, one for each process."""
    run_dir = demo_in_docker["project"] / "artifacts" / "two"
    proc = run(*demo_in_docker["make"], "train", "PRESET=demo", "RUN_DIR=artifacts/two", "NPROC_PER_NODE=2",
               "GRAD_ACCUM=2", "MAX_STEPS=2", "WARMUP_STEPS=1", "SAVE_STEPS=2", env=demo_in_docker["env"], timeout=1200)
    log = proc.stdout + proc.stderr
    assert "--label cotune.stage=train " in log and "--ipc=host" in log, log[-3000:]
    summary = json.loads((run_dir / "train" / "run.json").read_text())["summary"]
    assert summary["global_step"] == 2, summary
    assert summary["processes"]["world_size"] == 2 and summary["processes"]["backend"] == "gloo", summary["processes"]
    assert (run_dir / "train" / "adapter" / "adapter_config.json").is_file()
    owners = {p.stat().st_uid for p in run_dir.rglob("*")}
    assert owners == {demo_in_docker["uid"]}, owners
