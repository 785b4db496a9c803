"""The reference recipe's own inputs through the real clients. A local Hub (tests/hubserver.py) publishes
`Conard/fortune-telling` (synthetic rows in its layout) and the embedded model laid out like `unsloth/Qwen3-8B`;
huggingface_hub and datasets fetch them with nothing changed but HF_ENDPOINT. The same chain runs again offline from
the filled cache with the server gone; and every way the Hub can be down, slow or wrong is one line, exit 2, at once."""
import hashlib
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PLANTED_TOKEN, ROOT, assert_user_error, error_lines, run_script, script_env
from cotune.data import sample_dataset_path
from hubserver import QWEN3_LAYOUT, LocalHub, fortune_dataset_files, fortune_rows, qwen3_layout

DATASET = "Conard/fortune-telling"
MODEL = "cotune-tests/SmolLM2-135M-Instruct"
RECIPE = {"DATASET": DATASET, "DATASET_SPLIT": "train[0:200]", "EVAL_SPLIT": "train[200:220]", "BASE_MODEL": MODEL}
# The demo preset cut to two steps of one row: every stage runs on the fetched model and data; nothing is meant to be
# learned (the 20 held-out rows' loss, before and after, is most of train's time).
SHORT = {"PRESET": "demo", "MAX_STEPS": "2", "WARMUP_STEPS": "0", "SAVE_STEPS": "2", "BATCH_SIZE": "1",
         "GGUF_QUANTS": "Q8_0", "EVAL_QUESTIONS": "0", "MAX_NEW_TOKENS_BEFORE": "16", "MAX_NEW_TOKENS_AFTER": "32"}
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def hub_env(home: Path, endpoint: str, token: str | None = PLANTED_TOKEN, **extra) -> dict:
    """A user's environment with HF_ENDPOINT pointing at `endpoint` and its own Hugging Face home."""
    env = {k: v for k, v in script_env(home).items() if k not in PROXY_VARIABLES and not k.startswith("HF_")}
    env.update(HF_HOME=str(home / "hf-home"), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1",
               NO_PROXY="127.0.0.1,127.0.0.2", no_proxy="127.0.0.1,127.0.0.2")
    if token:
        env["HF_TOKEN"] = token
    env.update(extra)
    return env


def settings_args(settings: dict) -> list[str]:
    return [item for name, value in settings.items() for item in (f"--{name.lower().replace('_', '-')}", value)]


def make(target: str, run: Path, env: dict, settings: dict) -> subprocess.CompletedProcess:
    """`make TARGET NAME=value ...` as a user types it on a machine without Docker."""
    env_file = run.parent / "empty.env"  # not the project's .env: the token comes from the environment
    env_file.touch()
    args = ["make", target, "RUN_IN=host", f"RUN_DIR={run}", f"ENV_FILE={env_file}",
            *(f"{k}={v}" for k, v in settings.items())]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


def triples(rows) -> str:
    """One hash for rows' (question, reasoning, response), whichever names the columns carry."""
    keys = ("Question", "Complex_CoT", "Response") if "Question" in rows[0] else ("question", "reasoning", "response")
    text = json.dumps([[r[k].strip() for k in keys] for r in rows], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """What the local Hub publishes: the embedded model in Qwen3-8B's layout, and 240 synthetic dataset rows."""
    from cotune.models import embedded_hf_folder

    model = qwen3_layout(embedded_hf_folder(), tmp_path_factory.mktemp("served") / "model")
    return {"model": {p.name: p for p in model.iterdir()}, "rows": fortune_rows(sample_dataset_path())}


@pytest.mark.slow
def test_served_repos_are_laid_out_like_the_reference_ones(served):
    names = set(served["model"])
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) >= 2 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                           for i in range(1, len(shards) + 1)]
    assert names == QWEN3_LAYOUT | set(shards)
    index = json.loads(served["model"]["model.safetensors.index.json"].read_text())
    assert set(index["weight_map"].values()) == set(shards)
    rows = served["rows"]
    assert len(rows) >= 220 and len({r["Question"] for r in rows}) == len(rows)
    assert all(list(r) == ["Question", "Complex_CoT", "Response"] for r in rows)


def run_chain(run: Path, env: dict, settings: dict, stages: tuple, timings: dict) -> tuple:
    """`make export` into `run`, then each of `stages` (a script and its arguments) on that run folder, each timed
    into `timings` under the folder's name. Returns make's process and {the stage's last word: its process}."""
    t0 = time.monotonic()
    made = make("export", run, env, settings)
    timings[f"{run.name} make export"] = time.monotonic() - t0
    args = [*settings_args(settings), "--run-dir", str(run)]
    procs = {}
    for stage in stages:
        t0 = time.monotonic()
        procs[stage[-1]] = run_script(*stage, *args, env=env)
        timings[f"{run.name} {stage[-1]}"] = time.monotonic() - t0
    return made, procs


@pytest.fixture(scope="module")
def runs(served, tmp_path_factory):
    """The reference recipe's loading path, cut short, online through the local Hub and then offline from the cache
    with the server shut down: every stage that fetches (data, baseline, train, after, export) runs again, and verify.
    The report reads only the run's files."""
    root = tmp_path_factory.mktemp("hub-runs")
    settings = {**RECIPE, **SHORT}
    out = {"root": root, "timings": {}}
    with LocalHub(PLANTED_TOKEN) as hub:
        out["dataset_commit"] = hub.serve("dataset", DATASET, fortune_dataset_files(served["rows"]))
        out["model_commit"] = hub.serve("model", MODEL, served["model"], gated=True)
        env = hub_env(root, hub.base)
        out["online_make"], out["online"] = run_chain(
            root / "online", env, settings, (("verify",), ("ask", "baseline"), ("ask", "after"), ("report",)),
            out["timings"])
        out["auth_log"] = list(hub.auth_log)
        out["env"] = env
    # The server is gone: anything that still tried the network would be refused.
    env = {**env, "HF_HUB_OFFLINE": "1"}
    out["offline_make"], out["offline"] = run_chain(
        root / "offline", env, settings, (("verify",), ("ask", "baseline"), ("ask", "after")), out["timings"])
    print("timings (s):", {k: round(v, 1) for k, v in out["timings"].items()})
    return out


def record(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "run.json").read_text())


@pytest.mark.slow
def test_online_run_fetches_the_recipe_inputs_trains_exports_and_verifies(runs, served):
    online = runs["root"] / "online"
    proc = runs["online_make"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"DATASET {DATASET} at commit {runs['dataset_commit']} (main)" in proc.stdout
    assert f"BASE_MODEL {MODEL} at commit {runs['model_commit']} (main)" in proc.stdout
    # the rows trained on are exactly train[0:200] of the served file, the held-out ones train[200:220]
    assert triples(read_jsonl(online / "data" / "train.jsonl")) == triples(served["rows"][0:200])
    assert triples(read_jsonl(online / "data" / "eval.jsonl")) == triples(served["rows"][200:220])
    # the weights trained on are the served shards, fetched whole
    train = record(online, "train")
    snapshot = Path(train["inputs"]["base_model"]["path"])
    assert snapshot.name == runs["model_commit"] and "hf-home" in str(snapshot)
    for name, path in served["model"].items():
        assert (snapshot / name).read_bytes() == path.read_bytes(), name
    assert train["summary"]["global_step"] == 2
    verify = runs["online"]["verify"]
    assert verify.returncode in (0, 1) and "Traceback" not in verify.stderr, verify.stderr[-2000:]
    report = json.loads((online / "verify" / "report.json").read_text())
    assert report["file_type"] == "Q8_0" and report["answer"].strip()
    checks = {c["check"]: c["passed"] for c in report["checks"]}
    assert checks["chat template renders the training prompt"] and checks["EOS id matches the HF tokenizer"]
    for stage in ("baseline", "after", "report"):
        proc = runs["online"][stage]
        assert proc.returncode == 0, (stage, proc.stdout[-2000:], proc.stderr[-2000:])


@pytest.mark.slow
def test_the_commits_used_are_in_every_run_record_the_report_and_the_model_card(runs):
    online = runs["root"] / "online"
    dataset = {"repo_id": DATASET, "revision": "main", "commit": runs["dataset_commit"], "kind": "dataset"}
    model = {"repo_id": MODEL, "revision": "main", "commit": runs["model_commit"], "kind": "model"}
    for stage in ("data", "baseline", "train", "after", "export"):
        assert record(online, stage)["hub_commits"] == {"dataset": dataset, "base_model": model}, stage
    # the model card as push writes it (push itself refuses this run: two steps don't teach it to stop)
    from cotune.push import model_card
    from cotune.settings import resolve

    settings = resolve(environ={**RECIPE, **SHORT, "RUN_DIR": str(online)}, dotenv_path=Path("/nonexistent"))
    export = record(online, "export")
    card = model_card(settings, export, json.loads((online / "verify" / "report.json").read_text()),
                      json.loads((online / "report" / "report.json").read_text()),
                      [info["path"] for info in export["ggufs"].values()])
    for text in ((online / "report" / "report.md").read_text(), card):
        assert f"`{DATASET}` at commit `{runs['dataset_commit']}`" in text
        assert f"`{MODEL}` at commit `{runs['model_commit']}`" in text
    assert runs["dataset_commit"] in (online / "report" / "report.html").read_text()


@pytest.mark.slow
def test_offline_rerun_uses_the_cache_and_the_same_rows_and_weights(runs):
    online, offline = runs["root"] / "online", runs["root"] / "offline"
    proc = runs["offline_make"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"BASE_MODEL {MODEL} at commit {runs['model_commit']} (main), from the cache" in proc.stdout
    assert f"DATASET {DATASET} at commit {runs['dataset_commit']} (main), from the cache" in proc.stdout
    for name in ("train.jsonl", "eval.jsonl"):
        assert (offline / "data" / name).read_bytes() == (online / "data" / name).read_bytes(), name
    for stage in ("data", "train", "export"):
        assert record(offline, stage)["hub_commits"] == record(online, stage)["hub_commits"], stage
    same_weights = record(offline, "train")["inputs"]["base_model"]
    assert same_weights == record(online, "train")["inputs"]["base_model"]
    again, first = record(offline, "train")["summary"], record(online, "train")["summary"]
    for key in ("first_loss", "last_loss", "eval_loss_start", "eval_loss_end"):  # same rows, same weights, same seed
        assert abs(again[key] - first[key]) < 1e-4, (key, again[key], first[key])
    for stage, proc in runs["offline"].items():
        assert proc.returncode in ((0, 1) if stage == "verify" else (0,)), (stage, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, stage
    verified = json.loads((offline / "verify" / "report.json").read_text())["gguf"]  # named relative to its run folder
    assert not Path(verified).is_absolute() and (offline / verified).is_file(), verified
    for stage in ("baseline", "after"):
        assert f"BASE_MODEL {MODEL} at commit {runs['model_commit']} (main), from the cache" in \
            runs["offline"][stage].stdout, stage
        assert record(offline, stage)["hub_commits"] == record(online, stage)["hub_commits"], stage


@pytest.mark.slow
def test_the_token_goes_to_the_endpoint_only_and_is_written_nowhere(runs):
    hub_requests = [(path, auth) for server, path, auth in runs["auth_log"] if server == "hub"]
    cdn_requests = [(path, auth) for server, path, auth in runs["auth_log"] if server == "cdn"]
    assert any(auth and f"/{MODEL}/resolve/" in path for path, auth in hub_requests), "the gated model got the token"
    assert len(cdn_requests) >= 3 and not any(auth for _, auth in cdn_requests), "the LFS host never sees it"
    hits = [str(p) for folder in (runs["root"] / "hf-home", runs["root"] / "online", runs["root"] / "offline")
            for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and PLANTED_TOKEN.encode() in p.read_bytes()]
    procs = [runs["online_make"], runs["offline_make"], *runs["online"].values(), *runs["offline"].values()]
    hits += [str(p.args[:3]) for p in procs if PLANTED_TOKEN in p.stdout + p.stderr]
    assert not hits, hits
    assert record(runs["root"] / "online", "train")["settings"]["hf_token"] == "<set>"


# ---------------------------------------------------------------------- the Hub down, slow or wrong
FAST = ["--preset", "demo"]


def data_stage(tmp_path: Path, env: dict, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = run_script("data", *FAST, "--run-dir", str(tmp_path / "run"), *args, env=env, timeout=300)
    return proc, time.monotonic() - start


HUB_DATASET = ("--dataset", DATASET, "--dataset-split", "train[0:200]", "--eval-split", "train[200:220]")
HUB_MODEL = ("--base-model", MODEL)


@pytest.mark.parametrize("case, args, fragments", [
    ("dns", HUB_DATASET, ("DATASET='Conard/fortune-telling': not a local file, and the Hub is unreachable at "
                          "http://hub.invalid (no DNS entry for hub.invalid)", "HF_HUB_OFFLINE=1")),
    ("refused", HUB_MODEL, ("BASE_MODEL='cotune-tests/SmolLM2-135M-Instruct': not a local folder, and the Hub is "
                            "unreachable", "(connection refused)", "give a local folder")),
    ("down", HUB_DATASET, ("DATASET='Conard/fortune-telling': the Hub at", "failed with HTTP 500 (a server error, "
                           "not your settings); try again later")),
    ("slow", HUB_MODEL, ("did not answer within 1 s (HF_HUB_ETAG_TIMEOUT)",)),
    ("gated_without_token", HUB_MODEL, ("BASE_MODEL='cotune-tests/SmolLM2-135M-Instruct': a gated repo, and HF_TOKEN "
                                        "is not set; put HF_TOKEN=hf_... in .env or the environment",)),
    ("gated_other_token", HUB_MODEL, ("a gated repo, and the account of HF_TOKEN has no access (403)",)),
    ("no_model_repo", ("--base-model", "cotune-tests/no-such-model"),
     ("BASE_MODEL='cotune-tests/no-such-model': no such model repo on the Hub at",)),
    ("no_dataset_repo", ("--dataset", "cotune-tests/no-such-data"),
     ("DATASET='cotune-tests/no-such-data': no such dataset repo on the Hub at",)),
    ("no_model_revision", (*HUB_MODEL, "--model-revision", "v9.9"),
     ("MODEL_REVISION='v9.9': cotune-tests/SmolLM2-135M-Instruct has no such branch, tag or commit",)),
    ("no_dataset_revision", (*HUB_DATASET, "--dataset-revision", "0" * 40),
     (f"DATASET_REVISION='{'0' * 40}': Conard/fortune-telling has no such branch, tag or commit",)),
    ("other_columns", ("--dataset", "cotune-tests/instructions"),
     ("cotune-tests/instructions (train[0:40]): no column 'Question' (QUESTION_COLUMN); the columns are "
      "instruction, thought, output",)),
    ("offline_empty_cache", HUB_DATASET, ("DATASET='Conard/fortune-telling': not in the Hugging Face cache",
                                          "HF_HUB_OFFLINE=1 forbids downloading it")),
])
def test_a_hub_that_is_down_slow_or_wrong_is_one_line_at_once(tmp_path, case, args, fragments):
    rows = [{"Question": f"问题{i}", "Complex_CoT": f"推理{i}", "Response": f"回答{i}"} for i in range(240)]
    with LocalHub(PLANTED_TOKEN) as hub:
        hub.serve("dataset", DATASET, fortune_dataset_files(rows))
        hub.serve("dataset", "cotune-tests/instructions", {"data.json": json.dumps(
            [{"instruction": "问", "thought": "想", "output": "答"}] * 60, ensure_ascii=False).encode()})
        hub.serve("model", MODEL, {"config.json": b"{}"}, gated=True)
        endpoint, extra, token = hub.base, {}, PLANTED_TOKEN
        if case == "dns":
            endpoint = "http://hub.invalid"
        elif case == "refused":
            endpoint = f"http://127.0.0.1:{closed_port()}"
        elif case == "down":
            hub.fail_with = 500
        elif case == "slow":
            hub.delay_s, extra = 4, {"HF_HUB_ETAG_TIMEOUT": "1"}
        elif case == "gated_without_token":
            token = None
        elif case == "gated_other_token":
            token = "hf_" + "SomeoneElsesToken000000000000000000"
        elif case == "offline_empty_cache":
            extra = {"HF_HUB_OFFLINE": "1"}
        proc, seconds = data_stage(tmp_path, hub_env(tmp_path, endpoint, token=token, **extra), *args)
        paths = [path for _, path in hub.log]
    assert_user_error(proc, *fragments)
    assert len(error_lines(proc)) == 1, proc.stderr
    assert "Retrying" not in proc.stderr and PLANTED_TOKEN not in proc.stdout + proc.stderr
    if case in ("down", "slow"):
        assert len(paths) == len(set(paths)), f"a request was retried: {paths}"
    assert seconds < 20, f"{seconds:.1f} s: a Hub that can't answer must be reported at once, not after retries"
    assert not (tmp_path / "run" / "data" / "train.jsonl").exists()


def test_a_pinned_dataset_revision_loads_that_commit_not_main(tmp_path):
    """main moves on; DATASET_REVISION=<old commit> still gets the old rows, and the record says which commit."""
    rows = [{"Question": f"问题{i}", "Complex_CoT": f"推理{i}", "Response": f"回答{i}"} for i in range(60)]
    changed = [{**r, "Response": r["Response"] + "（改）"} for r in rows]
    with LocalHub(PLANTED_TOKEN) as hub:
        old = hub.serve("dataset", DATASET, fortune_dataset_files(rows))
        new = hub.serve("dataset", DATASET, fortune_dataset_files(changed))
        env = hub_env(tmp_path, hub.base)
        pinned, _ = data_stage(tmp_path / "pinned", env, "--dataset", DATASET, "--dataset-revision", old)
        latest, _ = data_stage(tmp_path / "latest", env, "--dataset", DATASET)
    for proc in (pinned, latest):
        assert proc.returncode == 0, proc.stderr[-2000:]
    pinned_rows = read_jsonl(tmp_path / "pinned" / "run" / "data" / "train.jsonl")
    latest_rows = read_jsonl(tmp_path / "latest" / "run" / "data" / "train.jsonl")
    assert triples(pinned_rows) == triples(rows[0:40]) and triples(latest_rows) == triples(changed[0:40])
    assert record(tmp_path / "pinned" / "run", "data")["hub_commits"]["dataset"]["commit"] == old
    assert record(tmp_path / "latest" / "run", "data")["hub_commits"]["dataset"] == {
        "repo_id": DATASET, "revision": "main", "commit": new, "kind": "dataset"}
