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


def docker_lines(*args, env=None):
    return [l for l in make_n(*args, env=env).splitlines() if " run --rm " in l]


def test_docker_command_has_gpu_mounts_user_and_secrets_by_name_only(tmp_path):
    env_file = tmp_path / "secret.env"
    env_file.write_text("HF_TOKEN=hf_" + "plantedplantedplantedplanted00\n")
    env = script_env(tmp_path, HF_TOKEN="hf_" + "plantedplantedplantedplanted00")
    docker = docker_lines("train", "RUN_IN=docker", f"ENV_FILE={env_file}", env=env)
    # `make train` on a GPU server runs data, then train, each in the container (each after its settings stamp)
    stages = [l.rsplit("/", 1)[-1] for l in docker if "--label cotune.stage=" in l]
    assert stages == ["data.py", "train.py"], docker
    line = docker[-1]
    for part in ("--gpus all", "--ipc=host", "--init", '--user "', ":/work/run", ":/hf-cache",
                 f'-v "{env_file}":"{env_file}":ro', f'-e COTUNE_ENV_FILE="{env_file}"', "-e HF_TOKEN ",
                 "-e MAX_STEPS ", "-e RUN_DIR=/work/run", f'-v "{ROOT}":"{ROOT}":ro -w "{ROOT}"'):
        assert part in line, part
    assert "hf_planted" not in make_n("train", "RUN_IN=docker", f"ENV_FILE={env_file}", env=env)


def test_cpu_flavor_runs_without_gpus_and_names_its_image():
    line = docker_lines("train", "RUN_IN=docker", "FLAVOR=cpu")[-1]
    assert "--gpus" not in line and " cotune:0.1.0-cpu python /opt/cotune/scripts/train.py" in line


def test_unknown_flavor_is_refused():
    proc = subprocess.run(["make", "-n", "train", "FLAVOR=rocm"], capture_output=True, text=True, cwd=ROOT,
                          env=script_env())
    assert proc.returncode != 0 and "FLAVOR=rocm: choose cuda or cpu" in proc.stderr


def test_verify_of_a_file_in_docker_mounts_its_folder_and_needs_no_venv(tmp_path):
    gguf = tmp_path / "m-Q8_0.gguf"
    out = make_n("verify", f"GGUF={gguf}", "RUN_IN=docker", "FLAVOR=cpu", "VENV=/nonexistent")
    line = [l for l in out.splitlines() if "verify.py" in l][-1]
    assert f'-v "{tmp_path}/":"{tmp_path}/"' in line and f'--gguf "{gguf}"' in line
    assert "/nonexistent" not in out and "setup" not in out


def test_makes_own_variables_are_not_taken_for_settings(tmp_path):
    """COTUNE_SKIP_PREFLIGHT, FLAVOR and the other Makefile variables pass the unknown-setting check."""
    proc = subprocess.run(["make", "where", "RUN_IN=host", "FLAVOR=cpu", "COTUNE_SKIP_PREFLIGHT=1", "MAX_STEP=3", "-p"],
                          capture_output=True, text=True, cwd=ROOT, env=script_env(tmp_path))
    names = next(l for l in proc.stdout.splitlines() if l.startswith("COTUNE_MAKE_VARS :="))
    assert names.split(":=")[1].split() == ["MAX_STEP"], names


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


def test_dockerignore_lets_in_only_what_the_image_needs():
    lines = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*"  # deny everything, then let in exactly these
    assert [l for l in lines if l.startswith("!")] == ["!requirements/", "!pyproject.toml", "!README.md", "!src/",
                                                       "!scripts/", "!docker/"]
    assert ".env" in lines and "**/.env" in lines
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_training_on_several_machines_shares_the_hosts_network_in_the_container(tmp_path):
    """Processes on several machines meet at MASTER_ADDR:MASTER_PORT, which Docker's bridge network hides: the train
    container (only it) then runs on the host's network, whether NNODES comes from make's command line or .env."""
    def lines(*args):
        return {l.split("--label cotune.stage=")[1].split()[0]: l for l in docker_lines(*args) if "--label" in l}

    for args in (["NNODES=2", "NODE_RANK=1", "MASTER_ADDR=10.0.0.1"], [f"ENV_FILE={tmp_path / 'nodes.env'}"]):
        (tmp_path / "nodes.env").write_text("NNODES=2\nNODE_RANK=0\nMASTER_ADDR=10.0.0.1\n")
        stages = lines("train", "RUN_IN=docker", *args)
        assert "--network host" in stages["train"] and "--network" not in stages["data"], (args, stages)
    assert "--network" not in lines("train", "RUN_IN=docker")["train"]
    assert "--network" not in lines("train", "RUN_IN=docker", "NNODES=1")["train"]
