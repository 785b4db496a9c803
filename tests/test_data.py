"""The data stage, run as a user runs it (the real script, the real tokenizer), and every bad input."""
import json

import pytest

from conftest import assert_user_error, run_script, script_env
from cotune.data import sample_dataset_path

DEMO = ("--preset", "demo")


def rows(n=12):
    return [{"Question": f"问题{i}", "Complex_CoT": f"推理{i}", "Response": f"回答{i}"} for i in range(n)]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")
    return path


def run_data(tmp_path, *args):
    return run_script("data", *DEMO, "--run-dir", str(tmp_path / "run"), *args, env=script_env(tmp_path))


def test_sample_dataset_is_ours_and_big_enough():
    items = [json.loads(l) for l in sample_dataset_path().read_text(encoding="utf-8").splitlines()]
    assert len(items) >= 40 and all(set(r) == {"Question", "Complex_CoT", "Response"} for r in items)
    assert len({r["Question"] for r in items}) == len(items)


def test_data_stage_on_the_sample(tmp_path):
    proc = run_data(tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "run" / "data"
    train = [json.loads(l) for l in (out / "train.jsonl").read_text().splitlines()]
    held = [json.loads(l) for l in (out / "eval.jsonl").read_text().splitlines()]
    assert (len(train), len(held)) == (40, 8)
    assert all(r["text"].endswith("<|im_end|>") and r["text"].count("<|im_end|>") == 1 for r in train)
    assert all(r["text"].startswith(r["prompt"]) for r in train)
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["eos_token_id"] == 2 and stats["train"]["max"] <= 640
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["preset"] == "demo" and "transformers" in record["versions"]
    assert len(record["inputs"]["dataset"]["sha256"]) == 64
    assert "train rows 40" in proc.stdout


def test_carved_eval_split_is_seeded_and_deterministic(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", rows(30))
    runs = []
    for name in ("a", "b", "c"):
        seed = "1" if name == "c" else "7"
        proc = run_script("data", *DEMO, "--run-dir", str(tmp_path / name), "--dataset", str(data),
                          "--dataset-split", "train", "--eval-split", "", "--eval-size", "5", "--seed", seed,
                          env=script_env(tmp_path))
        assert proc.returncode == 0, proc.stderr
        runs.append((tmp_path / name / "data" / "eval.jsonl").read_text())
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert len(runs[0].splitlines()) == 5


@pytest.mark.parametrize("case, fragments", [
    ("missing_column", ("no column 'Complex_CoT' (COT_COLUMN); the columns are Question, Response",)),
    ("empty_field", ("d.jsonl:4: field 'Response' is empty or not text",)),
    ("null_field", ("d.jsonl:3: field 'Question' is null",)),
    ("malformed_line", ("d.jsonl:4: not valid JSON",)),
    ("unknown_type", ("unknown file type .txt",)),
    ("no_file", ("no such file",)),
    ("bad_split", ("a local file has one split, 'train'",)),
    ("all_too_long", ("every row is longer than MAX_SEQ_LENGTH=16 tokens",)),
    ("empty_split", ("no rows; check DATASET and the split expressions",)),
    ("not_utf8", ("not UTF-8 text",)),
    ("hub_offline", ("DATASET='nobody/no-such-dataset': not a local file, and the Hub is unreachable",)),
])
def test_bad_data_inputs(tmp_path, case, fragments):
    d = tmp_path / "d.jsonl"
    args = ["--dataset", str(d), "--dataset-split", "train[0:8]", "--eval-split", "train[8:12]"]
    items = rows()
    if case == "missing_column":
        write_jsonl(d, [{k: v for k, v in r.items() if k != "Complex_CoT"} for r in items])
    elif case == "empty_field":
        items[3]["Response"] = "  "
        write_jsonl(d, items)
    elif case == "null_field":
        items[2]["Question"] = None
        write_jsonl(d, items)
    elif case == "malformed_line":
        write_jsonl(d, items)
        lines = d.read_text().splitlines()
        lines[3] = lines[3][:-5]
        d.write_text("\n".join(lines) + "\n")
    elif case == "unknown_type":
        args[1] = str(tmp_path / "d.txt")
        (tmp_path / "d.txt").write_text("x")
    elif case == "no_file":
        args[1] = str(tmp_path / "missing.jsonl")
    elif case == "bad_split":
        write_jsonl(d, items)
        args[3] = "validation[0:8]"
    elif case == "all_too_long":
        write_jsonl(d, items)
        args += ["--max-seq-length", "16"]
    elif case == "empty_split":
        write_jsonl(d, items)
        args[3] = "train[100:200]"
    elif case == "not_utf8":
        d.write_bytes("问题".encode("gbk") * 10)
    elif case == "hub_offline":
        args[1] = "nobody/no-such-dataset"
        env = script_env(tmp_path, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", NO_PROXY="127.0.0.1")
        return assert_user_error(run_script("data", *DEMO, "--run-dir", str(tmp_path / "run"), *args, env=env),
                                 *fragments)
    proc = run_data(tmp_path, *args)
    assert_user_error(proc, *fragments)


def test_failed_run_keeps_earlier_outputs(tmp_path):
    assert run_data(tmp_path).returncode == 0
    train = tmp_path / "run" / "data" / "train.jsonl"
    before = train.read_bytes()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"Question": "q"}])
    assert_user_error(run_data(tmp_path, "--dataset", str(bad)), "no column")
    assert train.read_bytes() == before


def test_unknown_flag_and_bad_value_exit_before_any_work(tmp_path):
    proc = run_data(tmp_path, "--lora-r", "0", "--max-steps", "x")
    assert_user_error(proc, "LORA_R=0: must be > 0",
                      "MAX_STEPS='x' (command line): expected a whole number")
    assert not (tmp_path / "run" / "data").exists()


# ---------------------------------------------------------------------- files as users save them
def write_csv(path, items, bom=False):
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(items[0]), lineterminator="\r\n")  # Excel's line ends
    writer.writeheader()
    writer.writerows(items)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode("utf-8"))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path, suffix):
    """Excel's "CSV UTF-8" (and some editors) start the file with a byte-order mark."""
    from cotune.data import read_local_rows

    path = tmp_path / f"d{suffix}"
    if suffix == ".csv":
        write_csv(path, rows(), bom=True)
    else:
        text = json.dumps(rows(), ensure_ascii=False) if suffix == ".json" else \
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows())
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    read = read_local_rows(path)
    assert [r for r, _ in read] == rows()
    assert list(read[0][0])[0] == "Question"


def test_an_excel_csv_trains(tmp_path):
    d = write_csv(tmp_path / "excel.csv", rows(), bom=True)
    proc = run_data(tmp_path, "--dataset", str(d), "--dataset-split", "train[0:8]", "--eval-split", "train[8:12]")
    assert proc.returncode == 0, proc.stderr
    train = [json.loads(l) for l in (tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()]
    assert [r["question"] for r in train] == [f"问题{i}" for i in range(8)]


@pytest.mark.parametrize("name, content, fragment", [
    ("empty.jsonl", b"", "empty.jsonl: the file is empty"),
    ("blank.json", b"\n  \n", "blank.json: the file is empty"),
    ("bom-only.csv", b"\xef\xbb\xbf", "bom-only.csv: the file is empty"),
    ("header-only.csv", b"\xef\xbb\xbfQuestion,Complex_CoT,Response\r\n", "a header line and no rows"),
    ("empty-list.json", b"[]", "empty-list.json: holds no rows"),
])
def test_an_empty_file_says_so(tmp_path, name, content, fragment):
    (tmp_path / name).write_bytes(content)
    proc = run_data(tmp_path, "--dataset", str(tmp_path / name), "--dataset-split", "train", "--eval-split", "")
    assert_user_error(proc, fragment)
    assert "EVAL_SIZE" not in proc.stderr


# ---------------------------------------------------------------------- where a bad row is
@pytest.mark.parametrize("suffix, place", [
    (".jsonl", "d.jsonl:7:"),  # file line 7 is the 7th row: index 6 in the file, the 4th of train[3:10]
    (".csv", "d.csv:10:"),  # the header, then row index 1 spans three lines (a quoted field with two line breaks)
    (".json", "d.json, record index 6:"),
    (".parquet", "d.parquet, row index 6:"),
])
def test_a_bad_row_is_named_by_its_place_in_the_file(tmp_path, suffix, place):
    items = rows()
    items[6]["Response"] = ""
    items[1]["Complex_CoT"] = "第一行\n第二行\n第三行"
    d = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        write_jsonl(d, items)
    elif suffix == ".csv":
        write_csv(d, items)
    elif suffix == ".json":
        d.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(items), d)
    proc = run_data(tmp_path, "--dataset", str(d), "--dataset-split", "train[3:10]", "--eval-split", "train[10:12]")
    assert_user_error(proc, f"{place} field 'Response' is empty or not text; fix or remove that row")


def test_a_bad_row_among_carved_held_out_rows_is_named_by_its_line(tmp_path):
    items = rows(30)
    items[17]["Question"] = None
    d = write_jsonl(tmp_path / "d.jsonl", items)
    proc = run_data(tmp_path, "--dataset", str(d), "--dataset-split", "train", "--eval-split", "")
    assert_user_error(proc, "d.jsonl:18: field 'Question' is null")


# ---------------------------------------------------------------------- held-out rows never trained on
def test_overlapping_expressions_are_refused_before_any_work(tmp_path):
    d = write_jsonl(tmp_path / "d.jsonl", rows(60))
    proc = run_data(tmp_path, "--dataset", str(d), "--dataset-split", "train[0:40]", "--eval-split", "train[:40]")
    assert_user_error(proc, "EVAL_SPLIT='train[:40]': shares 40 rows (0 to 39) with DATASET_SPLIT='train[0:40]'; "
                            "held-out rows must not be trained on")
    proc = run_data(tmp_path, "--dataset", str(d), "--dataset-split", "train[0:40]", "--eval-split", "train[30:50]")
    assert_user_error(proc, "EVAL_SPLIT='train[30:50]': shares 10 rows (30 to 39) with DATASET_SPLIT='train[0:40]'")
    assert not (tmp_path / "run" / "data").exists()


def test_overlap_that_depends_on_the_data_is_counted_by_the_rows(tmp_path):
    """train[0:10] and train[-50%:] of 12 rows: rows 6-9 are on both sides."""
    d = write_jsonl(tmp_path / "d.jsonl", rows(12))
    proc = run_data(tmp_path, "--dataset", str(d), "--dataset-split", "train[0:10]", "--eval-split", "train[-50%:]")
    assert_user_error(proc, "EVAL_SPLIT='train[-50%:]': 4 of its 6 rows are also in DATASET_SPLIT='train[0:10]' "
                            "(the first: ", "d.jsonl:7)")


def test_held_out_rows_that_repeat_a_training_row_are_warned_about(tmp_path):
    items = rows(12)
    items[10] = dict(items[2])  # a duplicate row, one copy on each side
    d = write_jsonl(tmp_path / "d.jsonl", items)
    proc = run_data(tmp_path, "--dataset", str(d), "--dataset-split", "train[0:8]", "--eval-split", "train[8:12]")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: 1 of 4 held-out rows repeat a training row word for word (the first: " in proc.stderr
    assert "d.jsonl:11 = " in proc.stderr and "d.jsonl:3)" in proc.stderr


@pytest.mark.parametrize("expression", ["train[-:5]", "train[0:200]junk", "train[150%:]", "train[0:10", "train[a:b]",
                                        "train[:]", "train[ 0 : 10 ]", "train[-20:]", "validation[10%:20%]"])
def test_the_settings_check_refuses_exactly_what_the_data_stage_cannot_apply(expression):
    """One parser for both: an expression passes the settings check if and only if the data stage can apply it."""
    from pathlib import Path

    from cotune.errors import UserError
    from cotune.settings import resolve
    from cotune.splits import parse_split

    try:
        applied = list(parse_split(expression).indices(50))
    except ValueError:
        applied = None
    try:
        resolve(environ={"DATASET_SPLIT": expression, "EVAL_SPLIT": ""}, dotenv_path=Path("/nonexistent"))
        accepted = True
    except UserError as err:
        accepted = False
        assert f"DATASET_SPLIT={expression!r}" in str(err)
    assert accepted == (applied is not None)
    expected = {"train[:]": range(50), "train[ 0 : 10 ]": range(10), "train[-20:]": range(30, 50),
                "validation[10%:20%]": range(5, 10)}
    if expression in expected:
        assert applied == list(expected[expression])
