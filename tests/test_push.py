"""Push: the real huggingface_hub client, end to end, against a local Hub server started by the test."""
import json
import os
import shutil

import pytest

from conftest import DEMO, PLANTED_TOKEN, ROOT, assert_user_error, error_lines, run_script
from hubserver import LocalHub
from netfaults import SilentServer

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
    """The demo run's folder as push reads it; not the merged weights (half a GB a copy), which push never reads."""
    run = tmp_path / "run"
    for stage in ("data", "train", "export", "verify", "report"):
        shutil.copytree(demo_run["run"] / stage, run / stage,
                        ignore=shutil.ignore_patterns("checkpoints", ".lock", "merged"))
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
    ("changed_gguf", ("SmolLM2-135M-Instruct-cotune-Q8_0.gguf: not the file export wrote",)),
    ("verify_of_other_content", ("speaks of", "not this run's SmolLM2-135M-Instruct-cotune-Q8_0.gguf",
                                 "run `make verify` again")),
    ("report_of_other_content", ("report/report.json: speaks of another GGUF", "run `make report` again")),
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
    elif case == "changed_gguf":
        with open(run_copy / "export" / "SmolLM2-135M-Instruct-cotune-Q8_0.gguf", "ab") as fh:
            fh.write(b"\0")
    elif case in ("verify_of_other_content", "report_of_other_content"):
        path = report if case == "verify_of_other_content" else run_copy / "report" / "report.json"
        data = json.loads(path.read_text())
        data["sha256" if case == "verify_of_other_content" else "gguf"] = (
            "0" * 64 if case == "verify_of_other_content" else {"name": "x.gguf", "sha256": "0" * 64})
        path.write_text(json.dumps(data))
    if case == "no_repo":
        proc = run_script("push", *DEMO, "--run-dir", str(run_copy), env=env)
    else:
        proc = push(demo_run, run_copy, env, *args)
    assert_user_error(proc, *fragments)


def test_a_touched_gguf_is_still_the_verified_one(demo_run, run_copy):
    """Whether a file changed is decided by its content: a newer time stamp alone is no change."""
    q8 = run_copy / "export" / "SmolLM2-135M-Instruct-cotune-Q8_0.gguf"
    report = run_copy / "verify" / "report.json"
    os.utime(q8, (report.stat().st_mtime + 60,) * 2)
    proc = push(demo_run, run_copy, push_env(demo_run, token=None), "--dry-run")
    assert proc.returncode == 0, proc.stderr


def test_verifying_another_file_keeps_the_runs_report(demo_run, run_copy):
    """`make verify GGUF=<the run's F16>` with the run's RUN_DIR: the F16's report goes beside, the run's stays,
    and the report and push go on speaking of the Q8_0."""
    report = run_copy / "verify" / "report.json"
    before = report.read_bytes()
    f16 = run_copy / "export" / "SmolLM2-135M-Instruct-cotune-F16.gguf"
    proc = run_script("verify", *DEMO, "--run-dir", str(run_copy), "--gguf", str(f16), env=demo_run["env"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report.read_bytes() == before
    other = json.loads((run_copy / "verify" / "others" / f"{f16.name}.json").read_text())
    assert other["file_type"] == "F16" and f"report in {run_copy / 'verify' / 'others'}" in proc.stdout
    proc = push(demo_run, run_copy, push_env(demo_run, token=None), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "| stopped on EOS before the token limit | pass |" in (run_copy / "push" / "README.md").read_text()


def test_a_moved_run_folder_pushes_its_own_files(demo_run, run_copy, tmp_path):
    moved = tmp_path / "moved"
    run_copy.rename(moved)
    proc = push(demo_run, moved, push_env(demo_run, token=None), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((moved / "export" / "run.json").read_text())
    assert record["ggufs"]["Q8_0"]["path"] == "export/SmolLM2-135M-Instruct-cotune-Q8_0.gguf", "relative to the run"
    assert not str(record["outputs"]["merged"]["path"]).startswith("/")


def test_model_card_front_matter_is_the_hubs(demo_run):
    from huggingface_hub import ModelCard

    push(demo_run, demo_run["run"], push_env(demo_run, token=None), "--dry-run")
    data = ModelCard((demo_run["run"] / "push" / "README.md").read_text()).data.to_dict()
    # the embedded model is a GGUF of SmolLM2-135M-Instruct; the sample data is a local file, not a Hub dataset
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and data["base_model_relation"] == "finetune"
    assert data["language"] == ["zh"] and data["pipeline_tag"] == "text-generation" and "datasets" not in data
    assert data["license"] == "apache-2.0" and data["library_name"] == "gguf" and "gguf" in data["tags"]


def test_model_card_names_the_reference_models_hub_lineage():
    from cotune.push import card_data
    from cotune.settings import resolve

    settings = resolve(environ={}, dotenv_path=ROOT / "no-such.env")
    data = card_data(settings, {"settings": settings.public_dict()}).to_dict()
    assert data["base_model"] == "unsloth/Qwen3-8B" and data["base_model_relation"] == "finetune"
    assert data["datasets"] == ["Conard/fortune-telling"] and data["language"] == ["zh"]


@pytest.fixture
def unreachable_hub(request):
    """HF_ENDPOINT of a Hub that fails the way a network does, and what the user must be told."""
    kind = request.param
    if kind == "stopped":  # the local Hub, started and stopped again: nothing listens on its port
        with LocalHub(PLANTED_TOKEN) as hub:
            endpoint = hub.base
        yield endpoint, "can't be reached (ConnectError"
    elif kind == "no_route":  # TEST-NET-1 (RFC 5737): never routed; refused at once or never answered
        yield "http://192.0.2.1", "pushing to cotune-tests/fortune-smollm2 failed: the Hub at http://192.0.2.1"
    elif kind == "dns":
        yield "http://hub.cotune-test.invalid", "can't be reached (ConnectError"
    elif kind == "tls":  # https to a server that speaks plain HTTP: the TLS handshake fails
        with LocalHub(PLANTED_TOKEN) as hub:
            yield hub.base.replace("http://", "https://"), "can't be reached (ConnectError"
    elif kind == "timeout":
        with SilentServer() as server:
            yield server.base, "did not answer within HUB_TIMEOUT=1 s (ReadTimeout)"
    elif kind == "5xx":  # the local Hub, down behind its load balancer: every request gets 503
        with LocalHub(PLANTED_TOKEN) as hub:
            hub.fail_with = 503
            yield hub.base, "failed (503: the Hub at"


@pytest.mark.parametrize("unreachable_hub", ["stopped", "no_route", "dns", "tls", "timeout", "5xx"], indirect=True)
def test_every_network_failure_of_push_is_one_line(demo_run, run_copy, unreachable_hub):
    endpoint, fragment = unreachable_hub
    env = push_env(demo_run, HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,.invalid")
    proc = run_script("push", *DEMO, "--run-dir", str(run_copy), "--hub-repo-id", REPO, "--hub-timeout", "1",
                      env=env, timeout=120)
    assert_user_error(proc, f"pushing to {REPO} failed", fragment, "run `make push` again")
    assert len(error_lines(proc)) == 1 and PLANTED_TOKEN not in proc.stdout + proc.stderr
