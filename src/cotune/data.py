"""The data stage: load rows (Hub or local file), check them, render each with the template, split off the
held-out rows, and write train/eval JSONL with token-length statistics."""
from __future__ import annotations

import csv
import json
import random
import re
from importlib import resources
from pathlib import Path

from .errors import UserError, warn
from .prompts import PromptTemplate
from .settings import SAMPLE_DATASET, Settings

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_SPLIT = re.compile(r"^(\w+)(?:\[\s*(-?\d*)(%?)\s*:\s*(-?\d*)(%?)\s*\])?$")


def sample_dataset_path() -> Path:
    return Path(str(resources.files("cotune") / "samples" / "fortune_sample.jsonl"))


def dataset_location(dataset: str) -> Path | None:
    """The local file behind DATASET, or None for a hub id."""
    if dataset == SAMPLE_DATASET:
        return sample_dataset_path()
    path = Path(dataset).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists() or dataset.startswith((".", "/", "~")):
        return path
    return None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg}); each line must be one JSON object")
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: a line must be a JSON object with the dataset's columns")
            rows.append(row)
    return rows


def read_local_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"DATASET={str(path)!r}: no such file")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise UserError(f"DATASET={str(path)!r}: unknown file type {suffix or '(none)'}; use "
                        f"{', '.join(LOCAL_SUFFIXES)} or a hub dataset id")
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise UserError(f"{path}: a .json dataset must be a list of objects (or {{\"data\": [...]}})")
            return data
        if suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as fh:
                return list(csv.DictReader(fh))
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except (OSError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{path}: can't read it as {suffix[1:]} ({type(err).__name__}: {err})") from None


def apply_split(rows: list[dict], expression: str, setting: str) -> list[dict]:
    """`train`, `train[0:200]`, `train[:10%]` on a local file's rows (which form one split, `train`)."""
    match = _SPLIT.match(expression.strip())
    if not match:
        raise UserError(f"{setting}={expression!r}: not a split expression like train or train[0:200]")
    name, start, start_pct, stop, stop_pct = match.groups()
    if name != "train":
        raise UserError(f"{setting}={expression!r}: a local file has one split, 'train'")

    def bound(value: str | None, pct: str | None) -> int | None:
        if not value:
            return None
        return round(len(rows) * int(value) / 100) if pct else int(value)

    return rows[bound(start, start_pct):bound(stop, stop_pct)]


def _load_hub_rows(settings: Settings, split: str, setting: str) -> list[dict]:
    import datasets

    datasets.utils.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(settings.dataset, settings.dataset_config or None, split=split)
    except ValueError as err:
        if "split" in str(err).lower() or "slice" in str(err).lower():
            raise UserError(f"{setting}={split!r}: {err}") from None
        raise UserError(f"DATASET={settings.dataset!r}: {err}") from None
    except Exception as err:  # datasets raises many types for "not found / offline"
        raise UserError(f"DATASET={settings.dataset!r}: not a local file and can't be loaded from the Hugging Face "
                        f"cache or Hub ({type(err).__name__}); on a machine without network use a local file or "
                        "PRESET=demo") from None
    return ds.to_list()


def load_rows(settings: Settings) -> tuple[list[dict], list[dict], Path | None]:
    """Training rows, held-out rows, and the local file they came from (None for the Hub)."""
    location = dataset_location(settings.dataset)
    if location is not None:
        everything = read_local_rows(location)
        train = apply_split(everything, settings.dataset_split, "DATASET_SPLIT")
        held = apply_split(everything, settings.eval_split, "EVAL_SPLIT") if settings.eval_split else None
    else:
        train = _load_hub_rows(settings, settings.dataset_split, "DATASET_SPLIT")
        held = _load_hub_rows(settings, settings.eval_split, "EVAL_SPLIT") if settings.eval_split else None
    if held is None:
        if len(train) <= settings.eval_size:
            raise UserError(f"EVAL_SIZE={settings.eval_size}: the split has only {len(train)} rows; lower EVAL_SIZE "
                            "or set EVAL_SPLIT")
        order = list(range(len(train)))
        random.Random(settings.seed).shuffle(order)
        held_idx = set(order[: settings.eval_size])
        held = [r for i, r in enumerate(train) if i in held_idx]
        train = [r for i, r in enumerate(train) if i not in held_idx]
    return train, held, location


def check_rows(rows: list[dict], settings: Settings, where: str) -> None:
    columns = (settings.question_column, settings.cot_column, settings.response_column)
    if not rows:
        raise UserError(f"{where}: no rows; check DATASET and the split expressions")
    available = list(rows[0].keys())
    for column, setting in zip(columns, ("QUESTION_COLUMN", "COT_COLUMN", "RESPONSE_COLUMN")):
        if column not in rows[0]:
            raise UserError(f"{where}: no column {column!r} ({setting}); the columns are {', '.join(available)}")
    for index, row in enumerate(rows):
        for column in columns:
            value = row.get(column)
            if value is None or not isinstance(value, str) or not value.strip():
                state = "missing" if column not in row else ("null" if value is None else "empty or not text")
                raise UserError(f"{where}: row {index} field {column!r} is {state}; fix or remove that row")


def render_rows(rows: list[dict], settings: Settings, template: PromptTemplate, tokenizer) -> list[dict]:
    eos = tokenizer.eos_token
    out = []
    for row in rows:
        question = row[settings.question_column].strip()
        text = template.training_text(question, row[settings.cot_column].strip(),
                                      row[settings.response_column].strip(), eos)
        out.append({
            "question": question,
            "reasoning": row[settings.cot_column].strip(),
            "response": row[settings.response_column].strip(),
            "prompt": template.prompt(question),
            "text": text,
            "n_tokens": len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        })
    return out


def drop_overlong(rendered: list[dict], max_len: int, where: str) -> tuple[list[dict], int]:
    kept = [r for r in rendered if r["n_tokens"] <= max_len]
    dropped = len(rendered) - len(kept)
    if not kept:
        raise UserError(f"{where}: every row is longer than MAX_SEQ_LENGTH={max_len} tokens (shortest: "
                        f"{min(r['n_tokens'] for r in rendered)}); raise MAX_SEQ_LENGTH")
    if dropped:
        warn(f"{where}: dropped {dropped} of {len(rendered)} rows longer than MAX_SEQ_LENGTH={max_len} tokens "
             "(truncating them would cut off the answer and its EOS)")
    return kept, dropped


def length_stats(rendered: list[dict]) -> dict:
    lengths = sorted(r["n_tokens"] for r in rendered)
    n = len(lengths)
    return {"rows": n, "min": lengths[0], "median": lengths[n // 2], "p95": lengths[min(n - 1, int(n * 0.95))],
            "max": lengths[-1], "mean": round(sum(lengths) / n, 1), "total_tokens": sum(lengths)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from .files import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: missing; run `make data` first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_data_stage(settings: Settings) -> dict:
    """Load, check, render, split and write; returns the statistics it wrote."""
    from .files import write_json_atomic, write_run_record
    from .models import load_tokenizer, resolve_model_path
    from .prompts import load_template

    template = load_template(settings.template)
    train_rows, eval_rows, location = load_rows(settings)
    where = str(location) if location else settings.dataset
    check_rows(train_rows, settings, f"{where} ({settings.dataset_split})")
    check_rows(eval_rows, settings, f"{where} (held-out rows)")
    tokenizer = load_tokenizer(resolve_model_path(settings.base_model))
    train, dropped_train = drop_overlong(render_rows(train_rows, settings, template, tokenizer),
                                         settings.max_seq_length, f"{where} training rows")
    held, dropped_eval = drop_overlong(render_rows(eval_rows, settings, template, tokenizer),
                                       settings.max_seq_length, f"{where} held-out rows")
    out = settings.stage_dir("data")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held)
    stats = {"train": length_stats(train), "eval": length_stats(held),
             "dropped_overlong": {"train": dropped_train, "eval": dropped_eval},
             "max_seq_length": settings.max_seq_length, "eos_token": tokenizer.eos_token,
             "eos_token_id": tokenizer.eos_token_id, "template": template.source}
    write_json_atomic(out / "stats.json", stats)
    inputs = {"dataset": location} if location else {}
    write_run_record(out, settings.public_dict(), inputs,
                     {"train": out / "train.jsonl", "eval": out / "eval.jsonl"},
                     extra={"dataset": settings.dataset, "stats": stats})
    return stats
