"""Push: the real huggingface_hub client, end to end, against a local Hub server started by the test."""
import json
import os
import shutil

import pytest

from conftest import DEMO, PLANTED_TOKEN, assert_user_error, run_script
from hubserver import LocalHub

pytestmark = pytest.mark.slow
REPO = "cotune-tests/fortune-smollm2"


def push_env(demo_run, hub=None, token=PLANTED_TOKEN, **extra):
    env = {k: v for k, v in demo_run["env"].items() if k != "HF_TOKEN"}
    if token:
        env["HF_TOKEN"] = token
    if hub:
        env.update(HF_ENDPOINT=hub.base, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1")
    env.update(extra)
    return env


def push(demo_run, run, env, *args):
    return run_script("push", *DEMO, "--run-dir", str(run), "--hub-repo-id", REPO, *args, env=env)


@pytest.fixture
def run_copy(demo_run, tmp_path):
    run = tmp_path / "run"
    for stage in ("data", "train", "export", "verify", "report"):
        shutil.copytree(demo_run["run"] / stage, run / stage, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    return run


def test_dry_run_lists_what_goes_where_and_needs_no_token(demo_run):
    proc = push(demo_run, demo_run["run"], push_env(demo_run, token=None), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((demo_run["run"] / "push" / "plan.json").read_text())
    files = {f["path"]: f for f in plan["files"]}
    assert set(files) == {"SmolLM2-135M-Instruct-cotune-Q8_0.gguf", "SmolLM2-135M-Instruct-cotune-F16.gguf",
                          "SmolLM2-135M-Instruct-cotune-Q4_K_M.gguf", "README.md", "Modelfile"}
    for f in plan["files"]:
        assert f"{f['path']}" in proc.stdout and f["sha256"] in proc.stdout and f"-> {REPO}" in proc.stdout
    q8 = demo_run["run"] / "export" / "SmolLM2-135M-Instruct-cotune-Q8_0.gguf"
    assert files[q8.name]["bytes"] == q8.stat().st_size


def test_modelfile_renders_the_training_prompt_and_stops_on_eos(demo_run):
    push(demo_run, demo_run["run"], push_env(demo_run, token=None), "--dry-run")
    modelfile = (demo_run["run"] / "push" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./SmolLM2-135M-Instruct-cotune-Q8_0.gguf\n")
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.count("{{") == 1, "one directive: the user's message"
    rendered = template.replace("{{ .Prompt }}", "1992年闰四月初九巳时生人,女,想了解健康运势")
    after = json.loads((demo_run["run"] / "after" / "answers.json").read_text())
    assert rendered == after["answers"][0]["prompt"]
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_model_card_has_front_matter_and_the_before_after_table(demo_run):
    push(demo_run, demo_run["run"], push_env(demo_run, token=None), "--dry-run")
    card = (demo_run["run"] / "push" / "README.md").read_text()
    assert card.startswith("---\n") and "license: apache-2.0" in card and "library_name: gguf" in card
    assert "| base | fine-tuned | GGUF Q8_0 |" in card and "stopped on EOS before the token limit | pass" in card
    assert "ollama create" in card and "llama-cli -m SmolLM2-135M-Instruct-cotune-Q8_0.gguf" in card


def test_push_creates_a_private_repo_uploads_everything_then_nothing_new(demo_run, run_copy):
    with LocalHub(PLANTED_TOKEN) as hub:
        first = push(demo_run, run_copy, push_env(demo_run, hub))
        assert first.returncode == 0, first.stdout + first.stderr
        repo = hub.repos[REPO]
        assert repo["private"] is True
        assert hub.card_front_matter["license"] == "apache-2.0" and "gguf" in hub.card_front_matter["tags"]
        plan = json.loads((run_copy / "push" / "plan.json").read_text())
        import hashlib

        for f in plan["files"]:
            assert hashlib.sha256(repo["files"][f["path"]]).hexdigest() == f["sha256"], f["path"]
        puts = sum(1 for m, _ in hub.log if m == "PUT")
        assert puts == 3, "three GGUF files through LFS, card and Modelfile inline"
        hub.log.clear()
        second = push(demo_run, run_copy, push_env(demo_run, hub))
        assert second.returncode == 0 and "nothing uploaded" in second.stdout
        assert not any(m == "PUT" or p.endswith("/commit/main") for m, p in hub.log)
    for proc in (first, second):
        assert PLANTED_TOKEN not in proc.stdout + proc.stderr
    for path in (run_copy / "push").rglob("*"):
        assert PLANTED_TOKEN.encode() not in path.read_bytes()


def test_interrupted_push_continues_without_sending_files_twice(demo_run, run_copy):
    with LocalHub(PLANTED_TOKEN) as hub:
        hub.fail_next_commit = True
        broken = push(demo_run, run_copy, push_env(demo_run, hub))
        assert_user_error(broken, f"pushing to {REPO} failed (500", "files already uploaded are not sent twice")
        assert len(hub.lfs) == 3 and not hub.repos[REPO]["files"]
        hub.log.clear()
        resumed = push(demo_run, run_copy, push_env(demo_run, hub))
        assert resumed.returncode == 0, resumed.stderr
        assert not any(m == "PUT" for m, _ in hub.log), "the GGUFs were already there"
        assert len(hub.repos[REPO]["files"]) == 5


def test_rejected_token_is_one_line(demo_run, run_copy):
    with LocalHub("hf_" + "TheRightTokenIsADifferentOne000000000") as hub:
        proc = push(demo_run, run_copy, push_env(demo_run, hub))
    assert_user_error(proc, "the Hub refused HF_TOKEN (401)")
    assert PLANTED_TOKEN not in proc.stdout + proc.stderr


@pytest.mark.parametrize("case, fragments", [
    ("no_token", ("HF_TOKEN is not set; put it in .env",)),
    ("no_repo", ("HUB_REPO_ID is not set",)),
    ("no_verify", ("verify/report.json: missing; only a verified GGUF is pushed",)),
    ("failed_verify", ("verify FAILED (stopped on EOS before the token limit)",)),
    ("stale_verify", ("older than SmolLM2-135M-Instruct-cotune-Q8_0.gguf",)),
])
def test_push_refusals(demo_run, run_copy, case, fragments):
    env = push_env(demo_run, token=None if case == "no_token" else PLANTED_TOKEN)
    report = run_copy / "verify" / "report.json"
    args = []
    if case == "no_verify":
        report.unlink()
    elif case == "failed_verify":
        data = json.loads(report.read_text())
        data["passed"] = False
        data["checks"][4]["passed"] = False
        report.write_text(json.dumps(data))
    elif case == "stale_verify":
        q8 = run_copy / "export" / "SmolLM2-135M-Instruct-cotune-Q8_0.gguf"
        os.utime(q8, (report.stat().st_mtime + 60,) * 2)
    if case == "no_repo":
        proc = run_script("push", *DEMO, "--run-dir", str(run_copy), env=env)
    else:
        proc = push(demo_run, run_copy, env, *args)
    assert_user_error(proc, *fragments)
