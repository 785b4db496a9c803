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
    ("empty_field", ("row 3 field 'Response' is empty or not text",)),
    ("null_field", ("row 2 field 'Question' is null",)),
    ("malformed_line", ("d.jsonl:4: not valid JSON",)),
    ("unknown_type", ("unknown file type .txt",)),
    ("no_file", ("no such file",)),
    ("bad_split", ("a local file has one split, 'train'",)),
    ("all_too_long", ("every row is longer than MAX_SEQ_LENGTH=16 tokens",)),
    ("empty_split", ("no rows; check DATASET and the split expressions",)),
    ("not_utf8", ("not UTF-8 text",)),
    ("hub_offline", ("DATASET='nobody/no-such-dataset': not a local file and can't be loaded",)),
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
