"""llama.cpp's HF -> GGUF converter, taken from the llama-cpp-python source distribution of exactly the installed
version (never committed, never cloned or built at export time). `python -m cotune.converter fetch` is run by
setup; export only looks it up."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from .errors import UserError
from .files import atomic_path
from .models import cache_root

CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        raise UserError("llama-cpp-python is not installed; run `make setup`") from None


def converter_dir(version: str | None = None) -> Path:
    # COTUNE_CONVERTER: a converter folder of its own (the image's, or one fetched for a host whose
    # llama-cpp-python is built apart)
    override = os.environ.get("COTUNE_CONVERTER")
    return Path(override) if override else cache_root() / f"llama.cpp-converter-{version or llama_cpp_version()}"


def converter_script() -> Path:
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"llama.cpp's converter is missing ({script}); run `make setup` (it fetches the converter "
                        f"of llama-cpp-python {llama_cpp_version()} once, with network)")
    return script


def fetch_converter(sdist: Path | None = None) -> Path:
    """Extract the converter of the installed llama-cpp-python version into the cache (idempotent)."""
    version = llama_cpp_version()
    target = converter_dir(version)
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            # pip keeps the download in its HTTP cache, so a second machine state costs no network
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "llama-cpp-python",
                            f"llama-cpp-python=={version}", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar, atomic_path(target) as out:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and any(m.name[len(prefix):].startswith(keep) for keep in CONVERTER_MEMBERS)]
            for member in members:
                member.name = member.name[len(prefix):]
            if hasattr(tarfile, "data_filter"):
                tar.extractall(out, members=members, filter="data")
            else:  # Python before 3.11.4 (Debian bookworm's 3.11.2) has no extraction filters: refuse what "data" would
                unsafe = [m.name for m in members if m.issym() or m.islnk() or m.isdev() or m.name.startswith("/")
                          or ".." in Path(m.name).parts]
                if unsafe:
                    raise UserError(f"{sdist}: unexpected links or paths in the converter's files: {unsafe[:3]}")
                tar.extractall(out, members=members)
    return target


def main() -> None:
    if sys.argv[1:2] != ["fetch"] or len(sys.argv) > 3:
        sys.exit("usage: python -m cotune.converter fetch [SDIST]  (SDIST: llama-cpp-python's .tar.gz, else pip "
                 "downloads it)")
    sdist = Path(sys.argv[2]) if len(sys.argv) == 3 else None
    print(f"llama.cpp converter: {fetch_converter(sdist)}")


if __name__ == "__main__":
    main()
