"""What can be checked of the CUDA image without building it: the entrypoint's preflight, run for real on this
GPU-less machine, and (with network: `pytest -m network`) that the image's pinned set agrees with itself for its
Python and platform. The cpu flavor is built and run for real in test_docker.py."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

IMAGE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
             "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def run_entrypoint(tmp_path, **env):
    path = "/usr/bin:/bin"  # no nvidia-smi on this machine
    return subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), "bash", "-c", 'echo "stage ran in $HOME"'],
                          capture_output=True, text=True, env={"PATH": path, "HOME": str(tmp_path), **env})


def test_cuda_flavor_without_a_gpu_says_how_to_pass_one(tmp_path):
    proc = run_entrypoint(tmp_path, COTUNE_FLAVOR="cuda")
    assert proc.returncode == 2 and "stage ran" not in proc.stdout
    assert "no GPU visible in the container; run it with --gpus all" in proc.stderr
    assert "make image FLAVOR=cpu" in proc.stderr


def test_cuda_preflight_can_be_bypassed(tmp_path):
    proc = run_entrypoint(tmp_path, COTUNE_FLAVOR="cuda", COTUNE_SKIP_PREFLIGHT="1")
    assert proc.returncode == 0 and proc.stdout.strip() == f"stage ran in {tmp_path}"


def test_cpu_flavor_needs_no_gpu(tmp_path):
    proc = run_entrypoint(tmp_path, COTUNE_FLAVOR="cpu")
    assert proc.returncode == 0 and proc.stdout.strip() == f"stage ran in {tmp_path}", proc.stderr


def test_a_user_without_a_writable_home_gets_one(tmp_path):
    """docker run --user UID:GID leaves HOME at the image user's folder, which that UID can't write."""
    proc = run_entrypoint(tmp_path, COTUNE_FLAVOR="cpu", HOME="/proc/no-such-home")
    assert proc.returncode == 0 and proc.stdout.strip().startswith("stage ran in /tmp/cotune-home-"), proc.stderr


def pins(path: Path) -> dict[str, Version]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = Version(next(iter(req.specifier)).version)
    return out


@pytest.fixture(scope="module")
def gpu_metadata(tmp_path_factory):
    """Each pinned package's METADATA, read from its wheel for CPython 3.12 on manylinux x86_64."""
    pinned = pins(ROOT / "requirements" / "gpu.txt")
    folder = tmp_path_factory.mktemp("wheels")
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                             "manylinux2014_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
                             "manylinux_2_35_x86_64") for a in ("--platform", p)]
    metadata = {}
    for name, version in pinned.items():
        # torch comes from the CUDA index (its pin is checked from the other side); llama-cpp-python is built from
        # source by the image's builder stage
        if name in ("torch", "llama-cpp-python"):
            continue
        target = folder / name
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(target),
                        f"{name}=={version}"], check=True, capture_output=True)
        wheel = next(target.glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            metadata[name] = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return pinned, metadata


@pytest.mark.network
def test_gpu_pins_satisfy_each_others_requirements(gpu_metadata):
    pinned, metadata = gpu_metadata
    conflicts = []
    for name, text in metadata.items():
        for line in text.splitlines():
            if line.startswith("Requires-Python:"):
                spec = line.split(":", 1)[1].strip()
                if spec and not Requirement(f"python{spec}").specifier.contains("3.12"):
                    conflicts.append(f"{name} needs Python {spec}")
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            dep = canonicalize_name(req.name)
            if dep not in pinned or (req.marker and not req.marker.evaluate(IMAGE_ENV)):
                continue
            if not req.specifier.contains(pinned[dep], prereleases=True):
                conflicts.append(f"{name}=={pinned[name]} requires {req}, pinned {dep}=={pinned[dep]}")
    assert not conflicts, conflicts


def test_the_cpu_set_differs_from_the_gpu_set_only_where_documented():
    cpu, gpu = pins(ROOT / "requirements" / "cpu.txt"), pins(ROOT / "requirements" / "gpu.txt")
    differ = {n for n in cpu.keys() & gpu.keys() if cpu[n] != gpu[n]}
    assert differ == {"torch", "trl"}, differ  # CPU torch build; trl 1.16 for its CPU loss path (see cpu.txt)
