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


def cache_root() -> Path:
    """cotune's own cache (the embedded model as a plain folder, llama.cpp's converter): COTUNE_CACHE, else
    ~/.cache/cotune."""
    return Path(os.environ.get("COTUNE_CACHE", Path.home() / ".cache" / "cotune"))


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


def run_relative(path: Path, run: Path) -> str:
    """A path as a record keeps it: relative to the run folder when it lies inside, so a moved or copied run folder
    names its own files; anything outside (a base model folder, a dataset file) as given."""
    try:
        return str(path.resolve().relative_to(run.resolve()))
    except ValueError:
        return str(path)


def write_run_record(stage_dir: Path, settings_dump: dict, inputs: dict[str, Path], outputs: dict[str, Path],
                     extra: dict | None = None, known_sha256: dict[Path, str] | None = None) -> dict:
    """`run.json` beside a stage's outputs: resolved settings (no secrets), what decided the stage (its settings and
    input files, compared by `make` through the stage's stamp), versions, the hub commits of the model and dataset
    used, input and output hashes (`known_sha256`: those the stage already took, e.g. while writing, so gigabytes
    aren't read twice). Paths are relative to the run folder."""
    from .hubrepo import commits_for_record

    known = known_sha256 or {}

    def sha256(p: Path) -> str:
        return known.get(p) or sha256_any(p)

    run = stage_dir.parent
    record = {
        "settings": settings_dump,
        "versions": package_versions(),
        "hub_commits": commits_for_record(stage_dir),
        "inputs": {name: {"path": run_relative(p, run), "sha256": sha256(p)} for name, p in inputs.items()
                   if p.exists()},
        "outputs": {name: {"path": run_relative(p, run), "sha256": sha256(p),
                           "bytes": p.stat().st_size if p.is_file() else None}
                    for name, p in outputs.items()},
    }
    if stage_dir.name in STAGE_RECORDS:
        record["stage_fingerprint"] = stage_fingerprint(stage_dir.name, settings_dump)
    if extra:
        record.update(extra)
    write_json_atomic(stage_dir / "run.json", record)
    return record


# The file each stage writes last, which make takes as the stage's output and which holds what decided it.
STAGE_RECORDS = {"data": "data/run.json", "baseline": "baseline/run.json", "train": "train/run.json",
                 "after": "after/run.json", "export": "export/run.json", "verify": "verify/report.json",
                 "report": "report/report.json"}


def stage_fingerprint(stage: str, settings_dump: dict) -> dict:
    """What decides a stage's outputs: its settings (settings.STAGE_SETTINGS) and, for the data stage, the content
    of the dataset file and the template it renders with. JSON-shaped, to compare with a record's."""
    from .settings import STAGE_SETTINGS

    out: dict = {"settings": {name: settings_dump[name] for name in STAGE_SETTINGS[stage]}}
    if stage == "data":
        from .data import dataset_location
        from .prompts import template_text

        location = dataset_location(settings_dump["dataset"])
        out["files"] = {"dataset_sha256": sha256_file(location) if location and location.is_file() else None,
                        "template_sha256": hashlib.sha256(
                            template_text(settings_dump["template"])[0].encode()).hexdigest()}
    return json.loads(json.dumps(out, ensure_ascii=False))


def recorded_fingerprint(run: Path, stage: str) -> dict | None:
    """What decided the stage's finished outputs in `run`, from its record; None when there are none."""
    path = run / STAGE_RECORDS[stage]
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    from .settings import with_later_settings

    found = with_later_settings(record.get("stage_fingerprint"), stage)
    if stage == "verify" and found is not None:
        found = {**found, "gguf_sha256": record.get("sha256")}
    return found


def wanted_fingerprint(run: Path, stage: str, settings) -> dict:
    """What the stage would be decided by now; for verify also the Q8_0 that the run's export wrote."""
    wanted = stage_fingerprint(stage, settings.public_dict())
    if stage == "verify":
        export = run / STAGE_RECORDS["export"]
        q8 = json.loads(export.read_text(encoding="utf-8"))["ggufs"].get("Q8_0", {}) if export.is_file() else {}
        wanted["gguf_sha256"] = q8.get("sha256")
    return wanted


def write_stage_stamp(run: Path, stage: str, settings, stamp: Path) -> bool:
    """Keep `stamp` (a prerequisite of the stage's record in the Makefile) older than the record when the record was
    made with what is asked now, and newer when not; True when the stage is current.

    The stamp says what the finished stage used, never what a run merely asked for: a run that was refused (another
    one held the lock, or training refused to mix settings) changes nothing that make reads."""
    wanted = wanted_fingerprint(run, stage, settings)
    current = recorded_fingerprint(run, stage) == wanted
    text = json.dumps(wanted, ensure_ascii=False, indent=1, sort_keys=True) + "\n"
    if not stamp.is_file() or stamp.read_text(encoding="utf-8") != text:
        write_text_atomic(stamp, text)
    if current:
        made = (run / STAGE_RECORDS[stage]).stat().st_mtime_ns
        if stamp.stat().st_mtime_ns > made:
            os.utime(stamp, ns=(made, made))
    else:
        os.utime(stamp)  # now: newer than the record, so make runs the stage
    return current


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
