"""Settings: precedence, every rejection (by its message), presets as a layer, .env.example in step."""
from pathlib import Path

import pytest

from cotune.errors import UserError
from cotune.settings import FIELDS, PRESETS, REFERENCE_QUESTION, Settings, example_env, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_reference_recipe():
    s = resolve(environ={}, dotenv_path=Path("/nonexistent"))
    assert (s.base_model, s.max_seq_length, s.load_in_4bit) == ("unsloth/Qwen3-8B", 2048, True)
    assert (s.dataset, s.dataset_config, s.dataset_split) == ("Conard/fortune-telling", "default", "train[0:200]")
    assert (s.question_column, s.cot_column, s.response_column) == ("Question", "Complex_CoT", "Response")
    assert (s.lora_r, s.lora_alpha, s.lora_dropout, s.lora_bias) == (16, 16, 0.0, "none")
    assert s.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (s.gradient_checkpointing, s.random_state, s.use_rslora, s.use_loftq) == ("unsloth", 3407, False, False)
    assert (s.batch_size, s.grad_accum, s.warmup_steps, s.max_steps, s.learning_rate) == (2, 4, 5, 75, 2e-4)
    assert (s.optim, s.weight_decay, s.lr_scheduler, s.seed, s.logging_steps) == ("adamw_8bit", 0.01, "linear", 3407, 1)
    assert s.probe_question == REFERENCE_QUESTION == "1992年闰四月初九巳时生人,女,想了解健康运势"
    assert (s.max_new_tokens_before, s.max_new_tokens_after) == (1200, 4000)
    assert s.gguf_quants == ["Q8_0"] and s.hub_repo_id == "" and s.completion_only_loss is False


def test_precedence_defaults_preset_dotenv_environment_cli(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("PRESET=demo\nMAX_STEPS=30\nLORA_R=8\nLEARNING_RATE=1e-3\n")
    env = {"LORA_R": "4", "LEARNING_RATE": "5e-4"}
    s = resolve({"learning_rate": "3e-4"}, environ=env, dotenv_path=dotenv)
    assert s.max_seq_length == PRESETS["demo"]["max_seq_length"]  # preset over default
    assert s.max_steps == 30  # .env over preset
    assert s.lora_r == 4  # environment over .env
    assert s.learning_rate == 3e-4  # command line over all
    assert s.weight_decay == 0.01 and "weight_decay" not in PRESETS["demo"]  # untouched default


def test_preset_is_a_layer_not_an_edit():
    resolve(environ={"PRESET": "demo"}, dotenv_path=Path("/nonexistent"))
    assert Settings().max_steps == 75 and FIELDS["base_model"].default == "unsloth/Qwen3-8B"


@pytest.mark.parametrize("env, message", [
    ({"LORA_R": "0"}, "LORA_R=0: must be > 0"),
    ({"LORA_R": "x"}, "LORA_R='x' (environment): expected a whole number"),
    ({"LEARNING_RATE": "0"}, "LEARNING_RATE=0.0: must be > 0"),
    ({"LEARNING_RATE": "fast"}, "LEARNING_RATE='fast' (environment): expected a number"),
    ({"MAX_STEPS": "0"}, "MAX_STEPS=0: must be > 0"),
    ({"BATCH_SIZE": "0"}, "BATCH_SIZE=0: must be > 0"),
    ({"GGUF_QUANTS": "Q8_0,Q3_K"}, "unknown quant type Q3_K; allowed: Q8_0, F16, Q4_K_M"),
    ({"GGUF_QUANTS": "F16"}, "must include Q8_0"),
    ({"BACKEND": "vllm"}, "BACKEND='vllm': not allowed; choose one of auto, unsloth, hf"),
    ({"LOAD_IN_4BIT": "maybe"}, "LOAD_IN_4BIT='maybe' (environment): expected true or false"),
    ({"LORA_DROPOUT": "1.5"}, "LORA_DROPOUT=1.5: must be in [0, 1)"),
    ({"WARMUP_STEPS": "80"}, "WARMUP_STEPS=80: must be below MAX_STEPS=75"),
    ({"DATASET_SPLIT": "train[0:"}, "is not a split expression"),
    ({"PRESET": "quick"}, "PRESET='quick': not allowed; choose one of '', demo, fast"),
    ({"HUB_REPO_ID": "no-slash"}, "HUB_REPO_ID='no-slash': must look like user/name"),
    ({"EVAL_SPLIT": "train[0:200]"}, "EVAL_SPLIT: must differ from DATASET_SPLIT"),
    ({"COTUNE_MAKE_VARS": "MAX_STEP"}, "make MAX_STEP=...: unknown setting; did you mean MAX_STEPS?"),
])
def test_rejections_name_the_setting_and_what_is_allowed(env, message):
    with pytest.raises(UserError) as err:
        resolve(environ=env, dotenv_path=Path("/nonexistent"))
    assert message in str(err.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(UserError) as err:
        resolve(environ={"LORA_R": "-1", "MAX_STEPS": "x", "OPTIM": "sgd"}, dotenv_path=Path("/nonexistent"))
    assert len(str(err.value).splitlines()) == 3


def test_unknown_key_in_dotenv_is_refused_with_a_suggestion(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("LORA_RANK=8\n")
    with pytest.raises(UserError) as err:
        resolve(environ={}, dotenv_path=dotenv)
    assert f"{dotenv}: unknown setting LORA_RANK; did you mean LORA_R?" in str(err.value)


def test_token_is_a_setting_but_never_dumped():
    s = resolve(environ={"HF_TOKEN": "hf_secretsecretsecret"}, dotenv_path=Path("/nonexistent"))
    assert s.hf_token == "hf_secretsecretsecret"
    assert "hf_secretsecretsecret" not in str(s.public_dict()) and s.public_dict()["hf_token"] == "<set>"


def test_env_example_is_in_step_with_the_settings():
    shipped = (ROOT / ".env.example").read_text()
    assert shipped == example_env(), "regenerate: python scripts/settings.py env-example > .env.example"
    for name in FIELDS:
        assert f"# {name.upper()}=" in shipped


def test_env_example_parses_as_a_dotenv(tmp_path):
    uncommented = tmp_path / ".env"
    lines = [l[2:] for l in example_env().splitlines() if l.startswith("# ") and "=" in l and l[2:3].isupper()
             and " " not in l[2:].split("=")[0]]
    uncommented.write_text("\n".join(lines) + "\n")
    s = resolve(environ={}, dotenv_path=uncommented)
    assert s == resolve(environ={}, dotenv_path=Path("/nonexistent"))


# --- values that passed the check and failed minutes later: each is refused at load, with the setting's name ---

NO_DOTENV = Path("/nonexistent")


def refusal(env: dict) -> str:
    with pytest.raises(UserError) as err:
        resolve(environ=env, dotenv_path=NO_DOTENV)
    return str(err.value)


@pytest.mark.parametrize("env, message", [
    # numpy's seed range, which transformers' set_seed feeds every seed to: -1 crashed the trainer at its start
    ({"SEED": "-1"}, "SEED=-1: must be between 0 and 4294967295"),
    ({"SEED": str(2**32)}, f"SEED={2**32}: must be between 0 and 4294967295"),
    ({"RANDOM_STATE": "-7"}, "RANDOM_STATE=-7: must be between 0 and 4294967295"),
    # float("inf") > 0 passed; training then diverged or crashed
    ({"LEARNING_RATE": "inf"}, "LEARNING_RATE='inf' (environment): expected a finite number"),
    ({"LEARNING_RATE": "nan"}, "LEARNING_RATE='nan' (environment): expected a finite number"),
    ({"WEIGHT_DECAY": "1e999"}, "WEIGHT_DECAY='1e999' (environment): expected a finite number"),
    ({"HUB_TIMEOUT": "-inf"}, "HUB_TIMEOUT='-inf' (environment): expected a finite number"),
    ({"LEARNING_RATE": "3"}, "LEARNING_RATE=3.0: must be > 0 and < 1"),
    # ints reach torch and llama.cpp as 32-bit values
    ({"MAX_NEW_TOKENS_AFTER": str(2**31)}, f"MAX_NEW_TOKENS_AFTER={2**31}: must be at most 2147483647"),
    ({"LORA_R": "99999999999"}, "LORA_R=99999999999: must be at most 2147483647"),
    # the run folder: '' wrote every stage into the current folder; spaces and colons broke make and docker -v
    ({"RUN_DIR": ""}, "RUN_DIR='': must name a folder"),
    ({"RUN_DIR": "my run"}, "RUN_DIR='my run': contains ' '"),
    ({"RUN_DIR": "runs:1"}, "RUN_DIR='runs:1': contains ':'"),
    ({"RUN_DIR": "~/runs"}, "RUN_DIR='~/runs': write the full path"),
    ({"RUN_DIR": "/etc/hostname/run"}, "RUN_DIR='/etc/hostname/run': can't be created: /etc/hostname is not a folder"),
    ({"RUN_DIR": "/etc/hostname"}, "RUN_DIR='/etc/hostname': exists and is not a folder"),
    # Hub ids the Hub client refuses (validate_repo_id): the real push crashed after the dry run passed
    ({"HUB_REPO_ID": "me/my model"}, "HUB_REPO_ID='me/my model': is not a Hub id"),
    ({"HUB_REPO_ID": "me/-model"}, "HUB_REPO_ID='me/-model': is not a Hub id"),
    ({"HUB_REPO_ID": "me/model--v2"}, "-- and .. are not allowed"),
    ({"HUB_REPO_ID": "me/model.git"}, "may not end in .git"),
    ({"HUB_REPO_ID": "org/team/model"}, "has more than one /"),
    ({"HUB_REPO_ID": "me/" + "m" * 97}, "96 characters at most"),
    ({"HUB_REPO_ID": "me/café"}, "is not a Hub id"),
    ({"BASE_MODEL": "Qwen/Qwen3 8B"}, "BASE_MODEL='Qwen/Qwen3 8B': not a local folder, and is not a Hub id"),
    ({"BASE_MODEL": "./no-such-model"}, "BASE_MODEL='./no-such-model': no such folder"),
    ({"BASE_MODEL": ""}, "BASE_MODEL='': must not be empty"),
    ({"BASE_MODEL": str(ROOT / "docs")}, "docs is not a model folder (no config.json there)"),
    ({"DATASET": "./no-such-rows.jsonl"}, "DATASET='./no-such-rows.jsonl': no such file"),
    ({"DATASET": "Conard/fortune telling"}, "DATASET='Conard/fortune telling': not a local file, and is not a Hub id"),
    ({"DATASET": ""}, "DATASET='': must not be empty"),
    ({"QUESTION_COLUMN": ""}, "QUESTION_COLUMN='': must name a column"),
    ({"COT_COLUMN": "Question"}, "QUESTION_COLUMN, COT_COLUMN, RESPONSE_COLUMN: must name three different columns"),
    ({"TARGET_MODULES": "q_proj;k_proj"}, "q_proj;k_proj: not a module name"),
    # a GGUF named .tmp-* was removed as a killed run's leftover by the next run
    ({"GGUF_NAME": ".tmp-model"}, "GGUF_NAME='.tmp-model': must not start with . or -"),
    # peft needs a loftq_config (and scipy) that cotune doesn't build; Unsloth ignored it
    ({"USE_LOFTQ": "true"}, "USE_LOFTQ=True: not supported"),
    ({"LOGGING_STEPS": "100"}, "LOGGING_STEPS=100: must be at most MAX_STEPS=75, else no training loss is ever logged"),
    ({"HUB_LICENSE": "Apache-2.0"}, "HUB_LICENSE='Apache-2.0': not a license id the Hub accepts; did you mean "
                                    "apache-2.0?"),
    ({"HUB_LICENSE": "other"}, "HUB_LICENSE='other': the Hub wants a LICENSE file"),
    ({"HUB_LANGUAGE": "Chinese"}, "Chinese: not a language code like zh, en or zh-Hans"),
    ({"HUB_TIMEOUT": "0"}, "HUB_TIMEOUT=0.0: must be > 0"),
    ({"BACKEND": "HF"}, "BACKEND='HF': not allowed; choose one of auto, unsloth, hf (did you mean hf?)"),
])
def test_values_a_later_stage_would_reject_are_refused_at_load(env, message):
    assert message in refusal(env)


def test_a_run_folder_on_a_read_only_disk_is_refused(tmp_path):
    import subprocess

    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("can't mount a read-only tmpfs here; needs root")
    try:
        assert f"can't be created or written: {mount} is not a writable folder" in refusal(
            {"RUN_DIR": str(mount / "run")})
    finally:
        subprocess.run(["umount", "-l", str(mount)])


@pytest.mark.parametrize("repo_id", [
    "me/model", "me/model.v2", "me/Model_2-b", "me/m", "a/" + "m" * 96, "me/model--v2", "me/model..x", "me/-model",
    "me/model-", "me/.model", "me/model.git", "me/my model", "me/café", "a/b/c", "me/" + "m" * 97, "-me/model"])
def test_hub_id_check_agrees_with_the_hub_client(repo_id):
    """What the check accepts the Hub client accepts, and what it refuses the client refuses."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from cotune.settings import hub_id_problem

    try:
        validate_repo_id(repo_id)
        client_accepts = True
    except HFValidationError:
        client_accepts = False
    assert (hub_id_problem(repo_id) is None) == client_accepts, (repo_id, hub_id_problem(repo_id))


@pytest.mark.parametrize("seed", [0, 1, 3407, 2**32 - 1, -1, 2**32])
def test_seed_check_agrees_with_what_the_trainer_seeds(seed):
    """transformers' set_seed passes the seed to numpy, whose range is the narrowest."""
    import numpy as np

    try:
        np.random.seed(seed)
        numpy_accepts = True
    except ValueError:
        numpy_accepts = False
    try:
        resolve(environ={"SEED": str(seed), "RANDOM_STATE": str(seed)}, dotenv_path=NO_DOTENV)
        accepted = True
    except UserError:
        accepted = False
    assert accepted == numpy_accepts


def test_a_bad_template_is_refused_at_load_with_its_problem(tmp_path):
    template = tmp_path / "t.txt"
    template.write_text('"""{question}\n<think>\n{reasoning}\n</think>\n{response}', encoding="utf-8")
    assert f'template {template}: holds """ before {{reasoning}}' in refusal({"TEMPLATE": str(template)})
    assert "TEMPLATE='nope': no such built-in template or file" in refusal({"TEMPLATE": "nope"})


def test_wrong_case_preset_is_one_line():
    lines = refusal({"PRESET": "Demo"}).splitlines()
    assert lines == ["PRESET='Demo': not allowed; choose one of '', demo, fast (did you mean demo?)"]


def test_every_setting_decides_its_stages_or_no_output():
    """One map says which settings decide which stage; a new setting must be placed in it."""
    from cotune.settings import DECIDES_NO_OUTPUT, STAGE_SETTINGS

    listed = {name for names in STAGE_SETTINGS.values() for name in names}
    assert listed <= set(FIELDS) and set(DECIDES_NO_OUTPUT) <= set(FIELDS)
    assert not listed & set(DECIDES_NO_OUTPUT)
    assert listed | set(DECIDES_NO_OUTPUT) == set(FIELDS), set(FIELDS) - listed - set(DECIDES_NO_OUTPUT)


def test_training_settings_decide_train_and_not_data_or_baseline():
    from cotune.settings import STAGE_SETTINGS

    training_only = [n for n in FIELDS if FIELDS[n].metadata["group"] in ("train", "lora") and n != "seed"]
    assert "learning_rate" in training_only
    for name in training_only:
        assert name in STAGE_SETTINGS["train"], name
        assert name not in STAGE_SETTINGS["data"] and name not in STAGE_SETTINGS["baseline"], name
    # the data stage reads its own settings, the seed (carved held-out rows), the tokenizer and the length limit
    data_group = {n for n in FIELDS if FIELDS[n].metadata["group"] == "data"}
    assert set(STAGE_SETTINGS["data"]) == data_group | {"seed", "base_model", "model_revision", "max_seq_length"}


# --- secrets ---

def test_no_helper_prints_the_token():
    from conftest import PLANTED_TOKEN, run_script, script_env

    env = script_env(HF_TOKEN=PLANTED_TOKEN)
    proc = run_script("settings", "get", "hf_token", env=env)
    assert proc.returncode == 2 and "HF_TOKEN is a secret" in proc.stderr
    assert PLANTED_TOKEN not in proc.stdout + proc.stderr
    s = resolve(environ={"HF_TOKEN": PLANTED_TOKEN}, dotenv_path=NO_DOTENV)
    assert PLANTED_TOKEN not in repr(s) and PLANTED_TOKEN not in str(s)


def test_a_malformed_token_is_refused_without_showing_it():
    token = "hf_" + "abcdefghijklmnopqrstuvwxyz0123 456"
    message = refusal({"HF_TOKEN": token})
    assert "HF_TOKEN: holds spaces, line breaks or non-ASCII characters" in message and token not in message
    assert "abcdefghij" not in message


# --- .env and ENV_FILE ---

def check(tmp_path, cwd=None, **env):
    from conftest import run_script, script_env

    environ = script_env(tmp_path)
    environ.pop("COTUNE_ENV_FILE")
    environ.update(env)
    return run_script("settings", "check", env=environ, cwd=cwd or tmp_path)


def test_a_dotenv_line_that_cannot_be_parsed_is_one_error_naming_file_and_line(tmp_path):
    from conftest import assert_user_error, error_lines

    dotenv = tmp_path / ".env"
    secret = "hf_" + "Unterminated0123456789abcdefghijklm"
    dotenv.write_text(f"MAX_STEPS=10\nHF_TOKEN=\"{secret}\nLORA_R 8\nSEED\n", encoding="utf-8")
    proc = check(tmp_path)
    assert_user_error(proc, f"{dotenv.name}:2: can't read this line as NAME=value",
                      f"{dotenv.name}:3: can't read this line as NAME=value", f"{dotenv.name}:4: SEED has no value")
    assert len(error_lines(proc)) == 3 and "python-dotenv" not in proc.stderr
    assert secret not in proc.stdout + proc.stderr


def test_a_dotenv_folder_and_a_named_env_file_that_is_missing_are_errors(tmp_path):
    from conftest import assert_user_error

    (tmp_path / ".env").mkdir()
    assert_user_error(check(tmp_path), ".env: is a folder, not a settings file")
    assert_user_error(check(tmp_path, ENV_FILE="prod.env", COTUNE_ENV_FILE="prod.env"),
                      "ENV_FILE=prod.env: no such file; create it, or leave ENV_FILE unset")


def test_a_missing_default_dotenv_is_normal(tmp_path):
    proc = check(tmp_path)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


# --- make's command line ---

def make_data(tmp_path, *assignments, **env):
    import subprocess

    from conftest import ROOT, script_env

    return subprocess.run(["make", "data", "RUN_IN=host", f"RUN_DIR={tmp_path / 'run'}", *assignments],
                          capture_output=True, text=True, cwd=ROOT, env=script_env(tmp_path, **env), timeout=120)


def test_a_dollar_that_make_expanded_is_caught(tmp_path):
    proc = make_data(tmp_path, "PROBE_QUESTION=price in $USD?")
    assert proc.returncode != 0
    assert ("error: make PROBE_QUESTION=price in $USD?: make read the $ as one of its variables and passed "
            "'price in SD?'; write $$ for a literal $") in proc.stderr
    assert not (tmp_path / "run" / "data").exists()


def test_a_token_on_makes_command_line_is_refused_and_not_shown(tmp_path):
    from conftest import PLANTED_TOKEN

    proc = make_data(tmp_path, f"HF_TOKEN={PLANTED_TOKEN}")
    assert proc.returncode != 0 and "error: make HF_TOKEN=...: a secret on make's command line" in proc.stderr
    assert PLANTED_TOKEN not in proc.stdout + proc.stderr


# --- the settings stamps make reads: they say what the finished stage used ---

STAGES = ("data", "baseline", "train", "after", "export", "verify")


def record_stage(run: Path, stage: str, env: dict, q8_sha256: str = "a" * 64) -> Path:
    """A finished stage's record, written as the stage writes it (verify: its report of the run's Q8_0)."""
    import json

    from cotune.files import stage_fingerprint, write_json_atomic, write_run_record

    public = resolve(environ=env, dotenv_path=NO_DOTENV).public_dict()
    if stage == "verify":
        write_json_atomic(run / "verify" / "report.json", {"sha256": q8_sha256, "settings": public,
                                                            "stage_fingerprint": stage_fingerprint("verify", public)})
        return run / "verify" / "report.json"
    extra = {"ggufs": {"Q8_0": {"path": "export/m-Q8_0.gguf", "sha256": "a" * 64}}} if stage == "export" else None
    (run / stage).mkdir(parents=True, exist_ok=True)
    write_run_record(run / stage, public, {}, {}, extra=extra)
    json.loads((run / stage / "run.json").read_text())
    return run / stage / "run.json"


def stamp(tmp_path: Path, run: Path, stage: str, **env) -> Path:
    """What `make` runs before each stage: scripts/settings.py stamp STAGE RUN/.stamps/STAGE.json."""
    from conftest import run_script, script_env

    path = run / ".stamps" / f"{stage}.json"
    run_script("settings", "stamp", stage, str(path), env=script_env(tmp_path, **env), check=True)
    return path


def stale(stamp_file: Path, record: Path) -> bool:
    """Make reruns a stage whose stamp is newer than its record."""
    return stamp_file.stat().st_mtime_ns > record.stat().st_mtime_ns


def test_a_refused_run_changes_nothing_make_reads(tmp_path):
    run = tmp_path / "run"
    first, second = {"DATASET_SPLIT": "train[0:100]"}, {"DATASET_SPLIT": "train[0:50]"}
    # a second `make data` with other settings stamps, then its stage is refused (the first holds the lock) ...
    stamp(tmp_path, run, "data", **second)
    # ... and the first run finishes, with its own settings
    record = record_stage(run, "data", first)
    assert stale(stamp(tmp_path, run, "data", **second), record), "the data was made with the first run's settings"
    assert not stale(stamp(tmp_path, run, "data", **first), record), "the first run's settings: up to date"
    assert stale(stamp(tmp_path, run, "data", **second), record)


def test_a_training_setting_makes_train_stale_and_not_data_or_baseline(tmp_path):
    run = tmp_path / "run"
    records = {stage: record_stage(run, stage, {}) for stage in STAGES}
    assert not any(stale(stamp(tmp_path, run, s), records[s]) for s in STAGES), "nothing changed: all current"
    changed = {s for s in STAGES if stale(stamp(tmp_path, run, s, LEARNING_RATE="1e-4"), records[s])}
    # after, export and verify follow train through Make's file graph (they read train/run.json)
    assert changed == {"train"}
    changed = {s for s in STAGES if stale(stamp(tmp_path, run, s, MAX_NEW_TOKENS_AFTER="300"), records[s])}
    assert changed == {"after", "verify"}


def test_a_verify_report_of_other_content_makes_verify_stale(tmp_path):
    """verify/report.json that speaks of another file than the export's Q8_0 (by sha256) is not current, so
    `make verify` runs again instead of saying it is up to date while push refuses."""
    run = tmp_path / "run"
    record_stage(run, "export", {})
    report = record_stage(run, "verify", {}, q8_sha256="b" * 64)
    assert stale(stamp(tmp_path, run, "verify"), report)
    report = record_stage(run, "verify", {}, q8_sha256="a" * 64)
    assert not stale(stamp(tmp_path, run, "verify"), report)


def test_a_record_older_than_a_new_setting_stays_current(tmp_path):
    """A stage finished by a cotune that had no TILED_MLP yet (its record lacks the name) is current under this one
    when the setting is at its default, which is what that cotune did; set otherwise, train is stale. The train
    stage's own fingerprint reads the same way, so the finished training is not refused either."""
    import json

    from cotune.train import finished_run, training_fingerprint

    run = tmp_path / "run"
    record = record_stage(run, "train", {})
    data = json.loads(record.read_text())
    del data["stage_fingerprint"]["settings"]["tiled_mlp"]
    record.write_text(json.dumps(data))
    assert not stale(stamp(tmp_path, run, "train"), record)
    assert stale(stamp(tmp_path, run, "train", TILED_MLP="true"), record)

    settings = resolve({"run_dir": str(run)}, environ={}, dotenv_path=NO_DOTENV)
    for name in ("train.jsonl", "eval.jsonl"):
        (run / "data").mkdir(exist_ok=True)
        (run / "data" / name).write_text("{}\n")
    old = training_fingerprint(settings)
    del old["settings"]["tiled_mlp"]
    (run / "train" / "fingerprint.json").write_text(json.dumps(old))
    assert finished_run(settings, training_fingerprint(settings)) is not None
    tiled = resolve({"run_dir": str(run), "tiled_mlp": "true"}, environ={}, dotenv_path=NO_DOTENV)
    assert finished_run(tiled, training_fingerprint(tiled)) is None
