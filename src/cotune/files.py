"""Atomic outputs, hashes and the run record written beside every stage's outputs."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator

# Packages whose versions decide what a stage produced.
TRACKED_PACKAGES = (
    "cotune", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "safetensors", "tokenizers",
    "bitsandbytes", "unsloth", "unsloth_zoo", "llama_cpp_python", "huggingface_hub", "numpy",
)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(path: Path) -> str:
    """One hash for a folder: relative names and file contents, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def sha256_any(path: Path) -> str:
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it into place only when the block ends without error.

    Works for files and folders. A killed process leaves only a `.tmp-*` sibling, never a half-written `final`.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent)) / (final.name + suffix)
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_run_record(stage_dir: Path, settings_dump: dict, inputs: dict[str, Path], outputs: dict[str, Path],
                     extra: dict | None = None, known_sha256: dict[Path, str] | None = None) -> dict:
    """`run.json` beside a stage's outputs: resolved settings (no secrets), versions, the hub commits of the model and
    dataset used, input and output hashes (`known_sha256`: those the stage already took, e.g. while writing, so
    gigabytes aren't read twice)."""
    from .hubrepo import commits_for_record

    known = known_sha256 or {}

    def sha256(p: Path) -> str:
        return known.get(p) or sha256_any(p)

    record = {
        "settings": settings_dump,
        "versions": package_versions(),
        "hub_commits": commits_for_record(stage_dir),
        "inputs": {name: {"path": str(p), "sha256": sha256(p)} for name, p in inputs.items() if p.exists()},
        "outputs": {name: {"path": str(p), "sha256": sha256(p),
                           "bytes": p.stat().st_size if p.is_file() else None}
                    for name, p in outputs.items()},
    }
    if extra:
        record.update(extra)
    write_json_atomic(stage_dir / "run.json", record)
    return record


def clean_stale_temporaries(folder: Path) -> None:
    """Remove what a killed earlier attempt left: `.tmp-*` (never renamed into place, so never taken as an output)
    and `.old-*` (a replaced folder whose removal was cut short). Call only while holding the stage lock."""
    if folder.is_dir():
        for leftover in [*folder.glob(".tmp-*"), *folder.glob(".old-*")]:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """llama.cpp logs from C straight to fd 2 (a line per tensor when quantizing); hide it while it works."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
