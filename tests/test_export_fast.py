"""The export hands the merged weights to llama.cpp's converter in memory, quantizes on every core and hashes while
writing; its GGUFs must be, byte for byte, what the unmodified converter writes from the saved merged folder. And the
quant type table is the one place a GGUF type is added."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import DEMO, SCRIPTS, assert_user_error, run_script, script_env

pytestmark = pytest.mark.slow

RANDOM_ADAPTER = """
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM
from cotune.models import embedded_hf_folder
from cotune.randmodel import save_random_adapter
base = embedded_hf_folder()
save_random_adapter(AutoModelForCausalLM.from_pretrained(base), base, Path(sys.argv[1]), seed=0)
"""


@pytest.fixture(scope="module")
def export_of_random_adapter(tmp_path_factory):
    """The demo model with a random r-16 adapter (bytes can be compared without training first), through the stage."""
    run = tmp_path_factory.mktemp("fast") / "run"
    env = script_env(run.parent)
    subprocess.run([sys.executable, "-c", RANDOM_ADAPTER, str(run / "train" / "adapter")], env=env, check=True,
                   capture_output=True)
    run_script("export", *DEMO, "--run-dir", str(run), env=env, check=True)
    return run, json.loads((run / "export" / "run.json").read_text())


@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
def test_in_memory_export_writes_exactly_what_the_converter_writes(export_of_random_adapter, tmp_path, quant):
    from cotune.converter import gguf_differences
    from cotune.export import convert_to_gguf
    from cotune.files import sha256_file

    run, record = export_of_random_adapter
    ours = run / record["ggufs"][quant]["path"]  # relative to the run folder
    reference = tmp_path / f"reference-{quant}.gguf"
    convert_to_gguf(run / "export" / "merged", reference, quant)  # convert_hf_to_gguf.py as is, on the saved folder
    assert gguf_differences(ours, reference) == []  # every metadata key, every tensor's name, type, shape and bytes
    assert sha256_file(ours) == sha256_file(reference) == record["ggufs"][quant]["sha256"]  # hashed while written


def test_the_comparison_sees_a_single_changed_byte(export_of_random_adapter, tmp_path):
    from cotune.converter import converter_gguf, gguf_differences

    run, record = export_of_random_adapter
    q8 = run / record["ggufs"]["Q8_0"]["path"]
    changed = tmp_path / "changed.gguf"
    shutil.copy(q8, changed)
    last = converter_gguf().GGUFReader(q8).tensors[-1]
    with open(changed, "r+b") as fh:
        fh.seek(last.data_offset + 5)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 1]))
    assert gguf_differences(q8, changed) == [f"tensor {last.name}: same type and shape, different bytes"]
    assert gguf_differences(q8, run / record["ggufs"]["F16"]["path"])[0] == "metadata general.file_type: differs in " \
                                                                         f"{q8.name}"


def test_export_record_times_every_step_and_keeps_no_intermediate(export_of_random_adapter):
    run, record = export_of_random_adapter
    seconds = record["seconds"]
    assert {"merge", "save_merged", "sha256_merged", "convert_F16", "convert_Q8_0", "quantize_Q4_K_M",
            "total"} <= set(seconds), seconds
    assert all(v >= 0 for v in seconds.values()) and seconds["total"] >= seconds["merge"] + seconds["convert_Q8_0"]
    assert record["outputs"]["merged"]["sha256"] and (run / "export" / "merged" / "model.safetensors").is_file()
    assert not list((run / "export").glob(".tmp-*")) and not list((run / "export").glob(".*.gguf"))


ADD_Q6_K = "from cotune import quants; quants.QUANTS['Q6_K'] = quants.QuantType('Q6_K', 'MOSTLY_Q6_K', 0.82, " \
           "quantized_from='F16')"


def run_with_q6_k_row(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    """A stage script in a process whose quant table has one more row, and nothing else changed."""
    code = f"{ADD_Q6_K}\nimport runpy, sys\nsys.argv = {[str(SCRIPTS / script), *args]!r}\n" \
           "runpy.run_path(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)


def test_a_quant_type_added_to_the_table_alone_is_written_and_verified(demo_run, tmp_path):
    run = tmp_path / "run"
    for stage in ("data", "train"):
        shutil.copytree(demo_run["run"] / stage, run / stage, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    env = demo_run["env"]
    args = (*DEMO, "--run-dir", str(run), "--gguf-quants", "Q8_0,Q6_K")
    assert_user_error(run_script("export", *args, env=env), "unknown quant type Q6_K; allowed: Q8_0, F16, Q4_K_M")

    proc = run_with_q6_k_row("export.py", *args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "export" / "run.json").read_text())
    assert list(record["ggufs"]) == ["Q8_0", "Q6_K"], "F16 was only the quantizer's source"
    q6_k = run / record["ggufs"]["Q6_K"]["path"]
    assert q6_k.name == "SmolLM2-135M-Instruct-cotune-Q6_K.gguf" and not list((run / "export").glob("*F16*"))

    verify = run_script("verify", *DEMO, "--run-dir", str(run), "--gguf", str(q6_k), env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = json.loads((run / "verify" / "others" / f"{q6_k.name}.json").read_text())  # not the run's Q8_0
    assert report["passed"] and report["file_type"] == "Q6_K", report["checks"]


@pytest.mark.parametrize("summary, cuda, expected, warning", [
    ({"dtype": "fp16", "load_in_4bit": False}, True, ("fp16", False), None),  # DTYPE=fp16 merges in fp16, not bf16
    ({"dtype": "bf16", "load_in_4bit": True}, True, ("bf16", True), None),
    ({"dtype": "bf16", "load_in_4bit": True}, False, ("fp32", False), "4-bit (NF4) on a GPU"),
    ({"dtype": "fp16", "load_in_4bit": False}, False, ("fp32", False), "training ran in fp16 on a GPU"),
    ({"dtype": "fp32", "load_in_4bit": False}, False, ("fp32", False), None),
])
def test_the_merge_runs_in_the_precision_training_used(tmp_path, capsys, summary, cuda, expected, warning):
    """Export reads the precision from the train stage's record: the backend's choice, made once."""
    from cotune.export import merge_precision
    from cotune.settings import resolve

    settings = resolve({"preset": "demo", "run_dir": str(tmp_path)}, environ={"COTUNE_ENV_FILE": "/nonexistent"})
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "run.json").write_text(json.dumps({"summary": summary}))
    assert merge_precision(settings, cuda) == expected
    err = capsys.readouterr().err
    assert (warning in err) if warning else "WARNING" not in err, err


def test_report_takes_verify_answer_only_when_asked_the_same_way(tmp_path):
    """The report reuses verify's reply to the probe (same file, greedy, same budget) instead of decoding it again;
    any other budget or decoding is asked anew."""
    from cotune.evaluation import gguf_answers, verify_reply
    from cotune.verify import GREEDY

    verify = {"prompt": "P", "answer": "why </think> so", "finish_reason": "stop", "completion_tokens": 7,
              "decoding": {**GREEDY, "max_tokens": 400}}
    known = verify_reply(verify, 400)
    # every prompt known: the GGUF is never opened (the path does not even exist)
    out = gguf_answers(tmp_path / "absent.gguf", [("probe", "q", "P")], 400, "</think>", known=known)
    assert out == [{"kind": "probe", "question": "q", "answer": "why </think> so", "completion_tokens": 7,
                    "stopped_on_eos": True, "closed_reasoning": True, "source": "verify"}]
    assert verify_reply(verify, 300) == {}, "another token budget: asked again"
    assert verify_reply({**verify, "decoding": {**GREEDY, "temperature": 0.7, "max_tokens": 400}}, 400) == {}
    assert verify_reply({k: v for k, v in verify.items() if k != "prompt"}, 400) == {}
