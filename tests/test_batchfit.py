"""BATCH_FIT=auto's choice for given memory sizes and row lengths (the rule itself, on numbers like Qwen3-8B's on
one card), what it does where there is nothing to fit, and ROPE_SCALING through the real loader and converter."""
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from cotune.batchfit import GiB, HEADROOM, MemoryModel, choose, fit_batch, memory_budget, micro_batch_tokens
from cotune.errors import UserError
from cotune.settings import resolve

# About Qwen3-8B in 4-bit through Unsloth: 6 GiB fixed, 36 layers; activations per token with no layer recomputing
# and with all of them recomputing (kept in host RAM), as a probe on a GPU would measure them.
QWEN3_8B = MemoryModel(fixed_bytes=6 * GiB, full_bytes_per_token=4.5 * 2**20, ckpt_bytes_per_token=0.25 * 2**20,
                       layers=36)
LOGNORMAL = [2048] * 10 + [1400] * 40 + [700] * 200 + [300] * 150  # the benchmark's spread, clipped at 2048


def settings(**values):
    return resolve({k: str(v) for k, v in values.items()}, environ={}, dotenv_path=Path("/nonexistent"))


def test_the_longest_micro_batch_is_priced_from_the_rows():
    assert micro_batch_tokens([100, 300, 200], 2, padding_free=True) == 500  # the two longest rows together
    assert micro_batch_tokens([100, 300, 200], 2, padding_free=False) == 600  # padded to the longest
    assert micro_batch_tokens([100], 4, padding_free=True) == 100


def test_a_large_card_gets_one_micro_batch_with_few_layers_recomputing():
    fit = choose(QWEN3_8B, 80 * GiB, 8, LOGNORMAL, padding_free=True, may_recompute=True)
    assert (fit.micro_batch, fit.grad_accum) == (8, 1)
    assert fit.micro_batch_tokens == 8 * 2048
    assert 0 < fit.recomputed_layers < 12  # most layers keep their activations: little recompute
    assert fit.predicted_peak_gib <= 80 * HEADROOM
    # one layer fewer recomputing would not have fitted: the fewest that fit
    assert QWEN3_8B.peak(fit.micro_batch_tokens, fit.recomputed_layers - 1) > 80 * GiB * HEADROOM


def test_a_24_gib_card_recomputes_more_layers_but_keeps_the_sequences_per_step():
    big = choose(QWEN3_8B, 80 * GiB, 8, LOGNORMAL, padding_free=True, may_recompute=True)
    small = choose(QWEN3_8B, 24 * GiB, 8, LOGNORMAL, padding_free=True, may_recompute=True)
    assert small.micro_batch * small.grad_accum == 8
    assert small.recomputed_layers > big.recomputed_layers
    assert small.predicted_peak_gib <= 24 * HEADROOM
    for fit in (big, small):
        assert json.loads(json.dumps(fit.record()))["micro_batch"] == fit.micro_batch  # recordable as is


def test_smaller_micro_batches_only_where_one_does_not_fit():
    # every layer recomputing, 8 x 2048 tokens need 6 + 4 GiB: a 9 GiB card takes 4 x 2 instead
    fit = choose(QWEN3_8B, 9 * GiB, 8, LOGNORMAL, padding_free=True, may_recompute=True)
    assert (fit.micro_batch, fit.grad_accum, fit.recomputed_layers) == (4, 2, 36)
    # a stack that pads fills every micro-batch to the longest row: never more tokens than padding-free
    padded = choose(QWEN3_8B, 24 * GiB, 8, [2048] + [300] * 50, padding_free=False, may_recompute=True)
    free = choose(QWEN3_8B, 24 * GiB, 8, [2048] + [300] * 50, padding_free=True, may_recompute=True)
    assert padded.micro_batch_tokens == 8 * 2048 and free.micro_batch_tokens == 2048 + 7 * 300
    assert free.recomputed_layers < padded.recomputed_layers


def test_without_checkpointing_only_the_micro_batch_moves():
    fit = choose(QWEN3_8B, 80 * GiB, 8, LOGNORMAL, padding_free=True, may_recompute=False)
    assert fit.recomputed_layers == 0 and fit.micro_batch < 8


def test_each_micro_batch_recomputes_only_what_its_own_tokens_need():
    # the fit is sized for the 8 longest rows together; a micro-batch of median rows needs no recompute at all
    fit = choose(QWEN3_8B, 80 * GiB, 8, LOGNORMAL, padding_free=True, may_recompute=True)
    limit = 80 * GiB * HEADROOM
    assert QWEN3_8B.fewest_recomputed(fit.micro_batch_tokens, limit) == fit.recomputed_layers > 0
    assert fit.micro_batch_tokens > fit.tokens_without_recompute > 8 * 700
    assert QWEN3_8B.fewest_recomputed(fit.tokens_without_recompute, limit) == 0
    assert QWEN3_8B.fewest_recomputed(fit.tokens_without_recompute + 64, limit) == 1
    assert f"none up to {fit.tokens_without_recompute:,} tokens, at most {fit.recomputed_layers} of 36" in fit.describe()
    plain = choose(QWEN3_8B, 80 * GiB, 8, LOGNORMAL, padding_free=True, may_recompute=False)
    assert "no layer recomputes" in plain.describe()


def test_the_hook_sets_each_micro_batchs_recompute_on_the_real_layers():
    """The embedded model's own decoder layers, trained for real on the CPU: the hook before each training forward
    pass sets how many layers recompute from that micro-batch's tokens, and the record counts the micro-batches."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerState

    from cotune.batchfit import arm, checkpointing_layers, keep_recomputed
    from cotune.models import embedded_hf_folder

    model = AutoModelForCausalLM.from_pretrained(embedded_hf_folder(), dtype=torch.float32)
    layers = checkpointing_layers(model)
    arm(model, layers)
    # 1 GiB fixed; 1 MiB per token kept, 0.1 MiB with every layer recomputing; the budget leaves 100 MiB above
    # the fixed part: up to 100 tokens recompute nothing, 2 rows of 100 tokens need most layers to recompute
    memory = MemoryModel(GiB, 2**20, 0.1 * 2**20, len(layers))
    plan = choose(memory, (GiB + 100 * 2**20) / HEADROOM, 2, [100, 100, 32, 32], padding_free=False,
                  may_recompute=True)
    fit = {**plan.record(), "memory_model": asdict(memory)}  # as fit_batch records it
    assert plan.micro_batch == 2 and 0 < plan.recomputed_layers < len(layers)
    [keep] = keep_recomputed(model, fit)
    state = TrainerState()
    keep.on_train_begin(None, state, None)
    model.train()
    counts = []
    for shape in [(2, 32), (2, 100), (1, 90)]:
        keep.on_step_begin(None, state, None)  # the longest micro-batch's count, then the hook lowers it
        ids = torch.randint(3, 1000, shape)
        model(input_ids=ids, labels=ids).loss.backward()
        counts.append(sum(layer.gradient_checkpointing for layer in layers))
    assert counts == [0, plan.recomputed_layers, 0]
    with torch.no_grad():  # the token count from positional ids and from embeddings too
        keep.on_step_begin(None, state, None)
        model(torch.randint(3, 1000, (1, 40)))
        assert sum(layer.gradient_checkpointing for layer in layers) == 0
        keep.on_step_begin(None, state, None)
        model(inputs_embeds=model.get_input_embeddings()(torch.randint(3, 1000, (2, 100))))
        assert sum(layer.gradient_checkpointing for layer in layers) == plan.recomputed_layers
    model.eval()
    model(input_ids=torch.randint(3, 1000, (1, 8)))  # not training: not counted
    state.global_step = 3
    keep.on_train_end(None, state, None)
    assert fit["micro_batches_by_recomputed_layers"] == {"0": 3, str(plan.recomputed_layers): 2}
    assert fit["counted_from_step"] == 0
    model.train()
    model(input_ids=torch.randint(3, 1000, (1, 8)))  # the hook is gone after training: not counted
    assert fit["micro_batches_by_recomputed_layers"] == {"0": 3, str(plan.recomputed_layers): 2}


def test_a_card_too_small_for_one_row_is_refused_in_one_line():
    with pytest.raises(UserError) as err:
        choose(QWEN3_8B, 6 * GiB, 8, LOGNORMAL, padding_free=True, may_recompute=True)
    message = str(err.value)
    assert "\n" not in message and "BATCH_FIT=auto" in message and "2,048 tokens" in message
    assert "lower MAX_SEQ_LENGTH" in message and "GPU_MEMORY_LIMIT_GIB" in message


def test_on_the_cpu_the_fit_and_the_limit_say_so_and_change_nothing():
    from cotune.backends import choose_backend

    warned = []
    s = settings(preset="fast", gpu_memory_limit_gib=24)
    assert s.batch_fit == "auto"
    backend = choose_backend(s, quiet=True)
    assert backend.device == "cpu"
    assert memory_budget(s, backend, warn_=warned.append) is None
    same, fit, why = fit_batch(s, backend, model=None, lengths=[100], budget_bytes=None, warn_=warned.append)
    assert same is s and fit is None and why == warned[-1]
    assert warned == ["GPU_MEMORY_LIMIT_GIB=24 ignored: no CUDA GPU",
                      "BATCH_FIT=auto fits the batch to a GPU's memory; on the CPU it does nothing, keeping "
                      "BATCH_SIZE=4 x GRAD_ACCUM=2"]
    assert fit_batch(settings(), backend, None, [100], None, warn_=warned.append)[1:] == (None, "BATCH_FIT=off")
    assert len(warned) == 2


@pytest.mark.parametrize("value", ["yarn", "yarn:1", "linear:4", "yarn:4:x", "yarn:0.5"])
def test_a_rope_scaling_that_is_not_yarn_with_a_factor_is_refused(value):
    with pytest.raises(UserError) as err:
        settings(rope_scaling=value)
    assert "ROPE_SCALING" in str(err.value) and "yarn:FACTOR" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_rope_scaling_reaches_the_model_the_merged_config_and_the_gguf(tmp_path):
    """The embedded model loaded with ROPE_SCALING=yarn:4 computes other logits than without, saves the YaRN
    parameters into its config, and llama.cpp's converter writes them into the GGUF."""
    import torch

    from cotune.backends import choose_backend
    from cotune.converter import converter_gguf
    from cotune.backends.hf import load_hf_model
    from cotune.export import convert_to_gguf
    from cotune.models import embedded_hf_folder, load_tokenizer

    folder = embedded_hf_folder()
    backend = choose_backend(settings(), quiet=True)
    plain, stretched = load_hf_model(folder, backend), load_hf_model(folder, backend, rope="yarn:4")
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert (plain(ids).logits - stretched(ids).logits).abs().max() > 1e-3
    stretched.save_pretrained(tmp_path / "merged")
    load_tokenizer(folder).save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())["rope_parameters"]
    assert saved["rope_type"] == "yarn" and saved["factor"] == 4.0
    assert saved["original_max_position_embeddings"] == plain.config.max_position_embeddings
    convert_to_gguf(tmp_path / "merged", tmp_path / "m.gguf", "F16")
    fields = converter_gguf().GGUFReader(tmp_path / "m.gguf").fields

    def value(key):
        field = fields[key]
        data = field.parts[field.data[0]]
        return bytes(data).decode() if field.types[0].name == "STRING" else float(data[0])

    assert value("llama.rope.scaling.type") == "yarn" and value("llama.rope.scaling.factor") == 4.0


@pytest.mark.gpu
def test_on_a_gpu_the_probe_measures_and_the_fit_keeps_the_sequences_per_step(tmp_path):
    """The probe and the per-micro-batch hook for real: a small random Qwen3 (8 layers) with LoRA on the GPU, one
    sequence with no layer and with every layer recomputing; the fitted plan keeps 8 sequences per step inside the
    budget, and three training steps through trl's trainer set each micro-batch's recompute and record it. The
    tokenizer is the embedded model's, or on a GPU host without it, the folder COTUNE_TEST_TOKENIZER names."""
    import os

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the fit measures GPU memory (CI has none; it runs on a GPU host)")
    from datasets import Dataset
    from trl import SFTTrainer

    from cotune.backends import choose_backend, load_for_training
    from cotune.batchfit import checkpointing_layers, keep_recomputed
    from cotune.distributed import plan
    from cotune.models import embedded_hf_folder
    from cotune.randmodel import build
    from cotune.train import sft_config

    tokenizer = Path(os.environ["COTUNE_TEST_TOKENIZER"]) if os.environ.get("COTUNE_TEST_TOKENIZER") else \
        embedded_hf_folder()
    model_dir = build("qwen3-tiny", tokenizer, tmp_path / "model")
    s = settings(backend="hf", load_in_4bit="false", batch_fit="auto", gpu_memory_limit_gib=4,
                 gradient_checkpointing="true", max_steps=3, warmup_steps=0, batch_size=1, grad_accum=8)
    backend = choose_backend(s, quiet=True)
    budget = memory_budget(s, backend)
    assert budget == 4 * GiB
    model, tok = load_for_training(s, backend, model_dir)
    lengths = [1500] * 8 + [300] * 32
    fitted, fit, why = fit_batch(s, backend, model, lengths, budget, say=lambda _m: None)
    assert why is None and fitted.batch_size * fitted.grad_accum == 8
    memory = fit["memory_model"]
    assert memory["full_bytes_per_token"] > memory["ckpt_bytes_per_token"] > 0 and memory["layers"] == 8
    assert fit["predicted_peak_gib"] <= 4 * HEADROOM
    layers = checkpointing_layers(model)
    assert sum(layer.gradient_checkpointing for layer in layers) == fit["recomputed_layers"]
    rows = [{"input_ids": list(range(3, 3 + n))} for n in lengths]
    config = sft_config(fitted, backend, plan(fitted, nproc_per_node=1, nnodes=1), "random", tmp_path / "ckpt",
                        eval_on_start=False, save_strategy="no", logging_steps=1)
    torch.cuda.reset_peak_memory_stats()
    SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
               callbacks=keep_recomputed(model, fit)).train()
    counted = {int(k): v for k, v in fit["micro_batches_by_recomputed_layers"].items()}
    assert sum(counted.values()) == 3 * fitted.grad_accum and max(counted) <= fit["recomputed_layers"]
    # the prediction is for the longest micro-batch the rows can make: no micro-batch of these rows goes beyond it
    assert torch.cuda.max_memory_allocated() <= fit["predicted_peak_gib"] * GiB
