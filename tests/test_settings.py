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
    assert s.batch_size == 2  # untouched default


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
