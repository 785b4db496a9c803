"""Faults and leaks: a kill at any moment leaves nothing that counts as done, a full disk is one clear line, and
the Hugging Face token appears in no file, output or command line of a whole run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DEMO, PLANTED_TOKEN, ROOT, SCRIPTS, assert_user_error, run_script, script_env

pytestmark = pytest.mark.slow


def copy_run(demo_run, target: Path, stages=("data", "train")) -> Path:
    for stage in stages:
        shutil.copytree(demo_run["run"] / stage, target / stage,
                        ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    return target


def kill_when(args, env, ready, timeout=300) -> None:
    """Start a stage in its own process group and SIGKILL the whole group (converter included) once `ready()`."""
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "the stage finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_during_export_leaves_nothing_done_and_a_rerun_completes(demo_run, tmp_path):
    run = copy_run(demo_run, tmp_path / "run")
    export = run / "export"
    env = demo_run["env"]
    # killed while llama.cpp's converter writes the first GGUF (a temporary exists next to the merged folder)
    kill_when([str(SCRIPTS / "export.py"), *DEMO, "--run-dir", str(run)], env,
              lambda: (export / "merged").is_dir() and any(p.suffix == ".gguf" for p in export.glob(".tmp-*/*")))
    assert not (export / "run.json").exists()
    assert not list(export.glob("*.gguf")), "a GGUF under its final name after a kill would be taken as done"
    assert list(export.glob(".tmp-*")), "the killed attempt's temporary is still there (and never taken as output)"
    run_script("export", *DEMO, "--run-dir", str(run), env=env, check=True)
    assert not list(export.glob(".tmp-*")), "the rerun cleaned the killed attempt's leftovers"
    proc = run_script("verify", *DEMO, "--run-dir", str(run), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sigkill_during_verify_keeps_the_previous_report(demo_run, tmp_path):
    run = copy_run(demo_run, tmp_path / "run", stages=("data", "train", "export"))
    record = json.loads((run / "export" / "run.json").read_text())
    gguf = run / "export" / Path(record["ggufs"]["Q8_0"]["path"]).name
    report = run / "verify" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text('{"passed": true, "note": "an earlier, complete report"}')
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "verify.py"), *DEMO, "--run-dir", str(run), "--gguf",
                             str(gguf)], env=demo_run["env"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    # killed at a known point: the GGUF is loaded and it is being asked (the line verify prints just before)
    asking = next((line for line in proc.stdout if line.startswith("asking ")), None)
    assert asking is not None and proc.poll() is None, "verify ended before it asked the GGUF"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads(report.read_text())["note"] == "an earlier, complete report"
    proc = run_script("verify", *DEMO, "--run-dir", str(run), "--gguf", str(gguf), env=demo_run["env"])
    assert proc.returncode == 0 and json.loads(report.read_text())["passed"] is True


def test_verify_sizes_its_context_to_the_question_and_the_answer_budget(demo_run):
    """Not the model's whole trained context (40k tokens, 5-6 GiB of KV cache for Qwen3-8B): the prompt, the answer
    budget (MAX_NEW_TOKENS_AFTER, 400 in the demo) and a margin."""
    from cotune.verify import CONTEXT_MARGIN

    report = json.loads((demo_run["run"] / "verify" / "report.json").read_text())
    assert report["n_ctx_train"] == 8192
    assert report["prompt_tokens"] + 400 <= report["n_ctx"] <= report["prompt_tokens"] + 1 + 400 + CONTEXT_MARGIN
    assert report["decoding"]["max_tokens"] == 400


def test_verify_prints_an_excerpt_of_a_long_answer_and_keeps_it_whole(tmp_path):
    """The untrained embedded model doesn't know the template and writes to its token limit."""
    from cotune.models import embedded_gguf_path

    gguf = embedded_gguf_path()
    proc = run_script("verify", *DEMO, "--run-dir", str(tmp_path / "run"), "--gguf", str(gguf),
                      "--max-new-tokens-after", "2400", env=script_env(tmp_path))  # about 2 tokens per character here
    assert "Traceback" not in proc.stderr, proc.stderr
    where = tmp_path / "run" / "verify" / "others" / f"{gguf.name}.json"
    report = json.loads(where.read_text())
    shown = proc.stdout.split("\nA: ", 1)[1].split("\n  PASS", 1)[0].split("\n  FAIL", 1)[0]
    assert len(report["answer"]) > 1000, "a long answer (else this test shows nothing)"
    assert len(shown.replace(str(where), "")) < 800 and shown.count("\n") <= 20, shown  # bounded, but for the path
    assert "more characters; the whole answer is in" in shown and report["answer"].startswith(shown[:200])


def test_an_answer_cut_at_its_token_limit_ends_on_a_whole_character():
    """Chinese characters are 3 bytes, often split across tokens: an answer cut at the limit used to end in U+FFFD
    in the report and the model card."""
    import torch

    from cotune.backends import choose_backend, load_for_generation
    from cotune.ask import generate_answers
    from cotune.models import resolve_model_path
    from cotune.prompts import load_template
    from cotune.settings import REFERENCE_QUESTION, resolve

    settings = resolve({"preset": "demo"}, environ={}, dotenv_path=ROOT / "no-such.env")
    backend = choose_backend(settings, quiet=True)
    model, tokenizer = load_for_generation(settings, backend, resolve_model_path(settings.base_model))
    prompt = load_template(settings.template).prompt(REFERENCE_QUESTION)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        full = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0]
    new = full[ids.shape[1]:].tolist()
    cut_inside = [n for n in range(1, len(new)) if tokenizer.decode(new[:n]).endswith("\ufffd")]
    assert cut_inside, "no token limit here cuts inside a character (else this test shows nothing)"
    for n in cut_inside:
        answer = generate_answers(model, tokenizer, [prompt], n, backend.device, batch_size=1)[0]["answer"]
        assert not answer.endswith("\ufffd") and answer == tokenizer.decode(new[:n]).rstrip("\ufffd"), n


def test_report_of_a_moved_run_folder_reads_its_own_files(demo_run, tmp_path):
    """A moved run folder's report finds its GGUFs in the folder it is given, not under the path it had."""
    copy = tmp_path / "copy"
    shutil.copytree(demo_run["run"], copy, ignore=shutil.ignore_patterns("checkpoints", ".lock", "report", "push"))
    moved = tmp_path / "moved"
    copy.rename(moved)
    proc = run_script("report", *DEMO, "--run-dir", str(moved), env=demo_run["env"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((moved / "report" / "report.json").read_text())
    assert report["title"] == "cotune report: SmolLM2-135M-Instruct-cotune-Q8_0.gguf"
    assert report["gguf"]["sha256"] == json.loads((moved / "verify" / "report.json").read_text())["sha256"]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"can't mount a size-limited tmpfs here ({proc.stderr.decode().strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_disk_full_during_export_is_one_clear_line_and_keeps_earlier_outputs(demo_run, small_disk):
    run = copy_run(demo_run, small_disk / "run")
    adapter_before = (run / "train" / "adapter" / "adapter_model.safetensors").read_bytes()
    # the preflight refuses first, with both numbers
    proc = run_script("export", *DEMO, "--run-dir", str(run), env=demo_run["env"])
    assert_user_error(proc, "GiB free, the merge and conversion need about", "free disk or point RUN_DIR elsewhere")
    # past the preflight, the disk really fills up mid-export
    proc = run_script("export", *DEMO, "--run-dir", str(run), "--disk-check", "false", env=demo_run["env"])
    assert_user_error(proc, "the disk filled up while exporting", "earlier stages' outputs are intact")
    assert (run / "train" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter_before
    assert not (run / "export" / "run.json").exists() and not list((run / "export").glob("*.gguf"))


def test_pickle_checkpoints_are_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    proc = run_script("data", *DEMO, "--run-dir", str(tmp_path / "run"), "--base-model", str(model),
                      env=script_env(tmp_path))
    assert_user_error(proc, "weights are pickle files (.bin/.pt)", "cotune loads safetensors only")


def test_token_leaks_nowhere(demo_run):
    """Every file of a whole demo run, every stage's output, and the docker command line."""
    hits = []
    for path in demo_run["run"].rglob("*"):
        if path.is_file() and PLANTED_TOKEN.encode() in path.read_bytes():
            hits.append(str(path))
    for proc in demo_run["outputs"]:
        if PLANTED_TOKEN in proc.stdout + proc.stderr:
            hits.append(f"output of {proc.args[1:3]}")
    if PLANTED_TOKEN in demo_run["train_log"]:
        hits.append("output of train")
    rendered = subprocess.run(["make", "-n", "all", "RUN_IN=docker"], capture_output=True, text=True, cwd=ROOT,
                              env=demo_run["env"])
    if PLANTED_TOKEN in rendered.stdout + rendered.stderr:
        hits.append("make -n all RUN_IN=docker")
    assert not hits, hits
    settings = json.loads((demo_run["run"] / "train" / "run.json").read_text())["settings"]
    assert settings["hf_token"] == "<set>", "the run saw the token (so the scan above was meaningful)"


def test_env_file_is_ignored_by_git_and_docker():
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in (ROOT / ".dockerignore").read_text().splitlines()


def test_memory_preflight_refuses_a_model_that_cannot_fit(tmp_path):
    """A folder whose safetensors header declares 1e12 weights: refused with numbers before anything loads."""
    import struct

    model = tmp_path / "huge"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    header = json.dumps({"w": {"dtype": "F32", "shape": [100000, 100000, 100], "data_offsets": [0, 0]}}).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    proc = run_script("ask", "baseline", *DEMO, "--run-dir", str(tmp_path / "run"), "--base-model", str(model),
                      "--eval-questions", "0", env=script_env(tmp_path))
    assert_user_error(proc, "asking the model needs about", "GiB RAM available; use a smaller model")


def test_resumed_training_ends_like_an_uninterrupted_run(demo_run, tmp_path):
    """The session's demo training was SIGKILLed after step 10 and resumed from checkpoint-8; an uninterrupted run
    with the same settings and data must end at the same place (checkpoints restore weights, optimizer, scheduler
    and RNG states). Noise allowed: 2 % of the loss, far below the 3.1 -> 0.7 the run travels."""
    run = tmp_path / "run"
    shutil.copytree(demo_run["run"] / "data", run / "data")
    run_script("train", *DEMO, "--run-dir", str(run), env=demo_run["env"], check=True)
    straight = json.loads((run / "train" / "run.json").read_text())["summary"]
    resumed = json.loads((demo_run["run"] / "train" / "run.json").read_text())["summary"]
    assert resumed["resumed_from"] and not straight["resumed_from"]
    assert straight["global_step"] == resumed["global_step"] == 24
    for key in ("last_loss", "eval_loss_end"):
        assert abs(straight[key] - resumed[key]) <= 0.02 * straight[key], (key, straight[key], resumed[key])
