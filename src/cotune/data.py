"""The data stage: load rows (Hub or local file), check them, render each with the template, split off the
held-out rows, and write train/eval JSONL with token-length statistics."""
from __future__ import annotations

import codecs
import csv
import json
import os
import random
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from . import hubrepo
from .errors import UserError, warn
from .prompts import PromptTemplate
from .settings import SAMPLE_DATASET, Settings
from .splits import Split, parse_split

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class Row(NamedTuple):
    values: dict
    place: str  # where a user finds it: "d.jsonl:4", "d.json, record index 3", "user/data, train row index 7"
    key: tuple  # the row's identity in the dataset: (split name, position in that split)


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


# Each reader gives (row, place) pairs. Text is read as "utf-8-sig": Excel's "CSV UTF-8" (and some editors) start a
# file with a byte-order mark, which would otherwise glue itself to the first column's name.
def _read_jsonl(path: Path) -> list[tuple[dict, str]]:
    rows = []
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg}); each line must be one JSON object")
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: a line must be a JSON object with the dataset's columns")
            rows.append((row, f"{path}:{number}"))
    return rows


def _read_json(path: Path) -> list[tuple[dict, str]]:
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path}: a .json dataset must be a list of objects (or {{\"data\": [...]}})")
    return [(row, f"{path}, record index {i}") for i, row in enumerate(data)]


def _read_csv(path: Path) -> list[tuple[dict, str]]:
    rows, header = [], None
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        first_line = 1
        try:
            for values in reader:
                line, first_line = first_line, reader.line_num + 1  # a quoted field may span lines
                if not values:
                    continue
                if header is None:
                    header = values
                    continue
                if len(values) > len(header) and any(v.strip() for v in values[len(header):]):
                    raise UserError(f"{path}:{line}: {len(values)} fields but the header has {len(header)}; quote a "
                                    "field that holds a comma")
                rows.append(({name: values[i] if i < len(values) else None for i, name in enumerate(header)},
                             f"{path}:{line}"))
        except csv.Error as err:
            raise UserError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    if header is not None and not rows:
        raise UserError(f"{path}: a header line and no rows; add the rows below it")
    return rows


def _read_parquet(path: Path) -> list[tuple[dict, str]]:
    import pyarrow.parquet as pq

    return [(row, f"{path}, row index {i}") for i, row in enumerate(pq.read_table(path).to_pylist())]


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    return len(head) < 1 << 16 and not head.removeprefix(codecs.BOM_UTF8).strip()


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_local_rows(path: Path) -> list[tuple[dict, str]]:
    if not path.is_file():
        raise UserError(f"DATASET={str(path)!r}: no such file")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise UserError(f"DATASET={str(path)!r}: unknown file type {suffix or '(none)'}; use "
                        f"{', '.join(LOCAL_SUFFIXES)} or a hub dataset id")
    try:
        if suffix != ".parquet" and _is_blank(path):
            raise UserError(f"{path}: the file is empty; put the dataset's rows in it, or point DATASET at another "
                            "file")
        rows = READERS[suffix](path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except (OSError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{path}: can't read it as {suffix[1:]} ({type(err).__name__}: {err})") from None
    if not rows:
        raise UserError(f"{path}: holds no rows; put the dataset's rows in it, or point DATASET at another file")
    return rows


def parse_split_setting(expression: str, setting: str) -> Split:
    try:
        return parse_split(expression)
    except ValueError as err:
        raise UserError(f"{setting}={expression!r}: {err}") from None


def apply_split(table: list[tuple[dict, str]], split: Split) -> list[Row]:
    """The rows a split expression picks from its split's rows, each keeping its place and position."""
    return [Row(table[i][0], table[i][1], (split.name, i)) for i in split.indices(len(table))]


def _load_hub_split(settings: Settings, commit: str, name: str, setting: str,
                    expression: str) -> list[tuple[dict, str]]:
    """All rows of one split of the hub dataset at `commit`, through datasets' own loader (the recipe's path)."""
    os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "false")  # else a HEAD to an S3 bucket, off the endpoint
    import datasets
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    datasets.utils.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(settings.dataset, settings.dataset_config or None, split=name, revision=commit,
                                   token=settings.hf_token or False)
    except ValueError as err:
        if "split" in str(err).lower():
            raise UserError(f"{setting}={expression!r}: {settings.dataset}: {err}") from None
        if "config" in str(err).lower():
            raise UserError(f"DATASET_CONFIG={settings.dataset_config!r}: {settings.dataset}: {err}") from None
        raise hubrepo.hub_failure(err, "dataset", settings.dataset, commit, settings.hf_token) from None
    except (OSError, HfHubHTTPError, httpx.HTTPError, datasets.exceptions.DatasetsError) as err:
        raise hubrepo.hub_failure(err, "dataset", settings.dataset, commit, settings.hf_token) from None
    cached = {Path(f["filename"]).parent.name for f in ds.cache_files}
    if hubrepo.offline() and cached != {commit}:
        raise UserError(f"DATASET={settings.dataset!r}: the datasets cache holds it at commit {', '.join(cached)}, "
                        f"not {commit} (DATASET_REVISION={settings.dataset_revision!r}); fetch that commit once online")
    return [(row, f"{settings.dataset}, {name} row index {i}") for i, row in enumerate(ds.to_list())]


def load_rows(settings: Settings) -> tuple[list[Row], list[Row], Path | None]:
    """Training rows, held-out rows, and the local file they came from (None for the Hub)."""
    location = dataset_location(settings.dataset)
    train_split = parse_split_setting(settings.dataset_split, "DATASET_SPLIT")
    eval_split = parse_split_setting(settings.eval_split, "EVAL_SPLIT") if settings.eval_split else None
    wanted = [("DATASET_SPLIT", settings.dataset_split, train_split)]
    if eval_split:
        wanted.append(("EVAL_SPLIT", settings.eval_split, eval_split))
    tables = {}
    if location is not None:
        hubrepo.USED["dataset"] = None
        if settings.dataset_revision != "main":
            warn(f"DATASET_REVISION={settings.dataset_revision!r} applies to a hub dataset only; {location} is read "
                 "as it is")
        for setting, expression, split in wanted:
            if split.name != "train":
                raise UserError(f"{setting}={expression!r}: a local file has one split, 'train'")
        tables["train"] = read_local_rows(location)
    else:
        commit = hubrepo.resolve_commit("dataset", settings.dataset, settings.dataset_revision, settings.hf_token)
        for setting, expression, split in wanted:
            if split.name not in tables:
                tables[split.name] = _load_hub_split(settings, commit, split.name, setting, expression)
        hubrepo.record("dataset", "dataset", settings.dataset, settings.dataset_revision, commit)
    train = apply_split(tables[train_split.name], train_split)
    if eval_split:
        return train, apply_split(tables[eval_split.name], eval_split), location
    if len(train) <= settings.eval_size:
        raise UserError(f"EVAL_SIZE={settings.eval_size}: the split has only {len(train)} rows; lower EVAL_SIZE "
                        "or set EVAL_SPLIT")
    order = list(range(len(train)))
    random.Random(settings.seed).shuffle(order)
    held_idx = set(order[: settings.eval_size])
    return ([r for i, r in enumerate(train) if i not in held_idx], [r for i, r in enumerate(train) if i in held_idx],
            location)


def check_rows(rows: list[Row], settings: Settings, where: str) -> None:
    columns = (settings.question_column, settings.cot_column, settings.response_column)
    if not rows:
        raise UserError(f"{where}: no rows; check DATASET and the split expressions")
    available = list(rows[0].values.keys())
    for column, setting in zip(columns, ("QUESTION_COLUMN", "COT_COLUMN", "RESPONSE_COLUMN")):
        if column not in rows[0].values:
            raise UserError(f"{where}: no column {column!r} ({setting}); the columns are {', '.join(available)}")
    for row in rows:
        for column in columns:
            value = row.values.get(column)
            if value is None or not isinstance(value, str) or not value.strip():
                state = "missing" if column not in row.values else ("null" if value is None else "empty or not text")
                raise UserError(f"{row.place}: field {column!r} is {state}; fix or remove that row")


def check_held_out(train: list[Row], held: list[Row], settings: Settings) -> None:
    """Held-out rows are never training rows (by position, whatever the expressions say); rows that repeat a
    training row word for word are allowed, with a warning."""
    shared = sorted({r.key for r in train} & {r.key for r in held})
    if shared:
        first = next(r.place for r in held if r.key == shared[0])
        raise UserError(f"EVAL_SPLIT={settings.eval_split!r}: {len(shared)} of its {len(held)} rows are also in "
                        f"DATASET_SPLIT={settings.dataset_split!r} (the first: {first}); held-out rows must not be "
                        "trained on, give EVAL_SPLIT rows outside DATASET_SPLIT")
    columns = (settings.question_column, settings.cot_column, settings.response_column)
    trained = {}
    for row in train:
        trained.setdefault(tuple(row.values[c].strip() for c in columns), row)
    repeats = [(row, trained[key]) for row in held if (key := tuple(row.values[c].strip() for c in columns)) in trained]
    if repeats:
        held_row, train_row = repeats[0]
        warn(f"{len(repeats)} of {len(held)} held-out rows repeat a training row word for word (the first: "
             f"{held_row.place} = {train_row.place}); their held-out loss measures recall, not generalisation. "
             "Remove the duplicates from the dataset")


def render_rows(rows: list[Row], settings: Settings, template: PromptTemplate, tokenizer) -> list[dict]:
    eos = tokenizer.eos_token
    out = []
    for row in (r.values for r in rows):
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
    from .models import base_model_path, load_tokenizer
    from .prompts import load_template

    template = load_template(settings.template)
    train_rows, eval_rows, location = load_rows(settings)
    where = str(location) if location else settings.dataset
    check_rows(train_rows, settings, f"{where} ({settings.dataset_split})")
    check_rows(eval_rows, settings, f"{where} (held-out rows)")
    check_held_out(train_rows, eval_rows, settings)
    tokenizer = load_tokenizer(base_model_path(settings))
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
