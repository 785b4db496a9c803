"""The Makefile renders the intended commands; the Dockerfile is lint-clean; secrets stay off command lines."""
import shutil
import subprocess

from conftest import ROOT, script_env


def make_n(*args, env=None):
    proc = subprocess.run(["make", "-n", *args], capture_output=True, text=True, cwd=ROOT, env=env or script_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_is_the_default_goal():
    out = subprocess.run(["make"], capture_output=True, text=True, cwd=ROOT, env=script_env()).stdout
    for target in ("setup", "data", "train", "export", "verify", "demo", "test", "image"):
        assert f"  {target} " in out


def test_docker_command_has_gpu_mounts_user_and_secrets_by_name_only(tmp_path):
    env_file = tmp_path / "secret.env"
    env_file.write_text("HF_TOKEN=hf_" + "plantedplantedplantedplanted00\n")
    env = script_env(tmp_path, HF_TOKEN="hf_" + "plantedplantedplantedplanted00")
    out = make_n("train", "RUN_IN=docker", f"ENV_FILE={env_file}", env=env)
    docker = [l for l in out.splitlines() if l.startswith("docker run")]
    # `make train` on a GPU server runs data, then train, each in the container
    assert [l.rsplit("/", 1)[-1] for l in docker] == ["data.py", "train.py"]
    line = docker[-1]
    for part in ("--gpus all", "--ipc=host", '--user "$(id -u):$(id -g)"', ":/work/run", ":/hf-cache",
                 f'--env-file "{env_file}"', "-e HF_TOKEN ", "-e MAX_STEPS ", "-e RUN_DIR=/work/run"):
        assert part in line, part
    assert "hf_planted" not in out


def test_host_command_runs_the_script_directly():
    out = make_n("train", "RUN_IN=host")
    assert ".venv/bin/python scripts/train.py" in out and "docker" not in out


def test_unknown_run_in_is_refused():
    proc = subprocess.run(["make", "-n", "train", "RUN_IN=k8s"], capture_output=True, text=True, cwd=ROOT,
                          env=script_env())
    assert proc.returncode != 0 and "RUN_IN=k8s: choose docker or host" in proc.stderr


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    proc = subprocess.run([hadolint, "Dockerfile"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerignore_keeps_secrets_and_artifacts_out():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[1] == "*" or "*" in lines  # deny everything, then let in what the image needs
    assert ".env" in lines and "!artifacts" not in " ".join(lines)
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
