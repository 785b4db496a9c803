"""The held-out loss the training stage records on the CPU (the opening every row shares run once) against
`trainer.evaluate()`'s, on the embedded model with a non-zero adapter and the demo's own held-out rows, in fp32 (the
stage keeps evaluate() under bf16 or fp16 autocast)."""
import dataclasses
from pathlib import Path

import pytest

from cotune.settings import resolve

REL = 1e-4  # fp32 sums in another order: measured 3e-6 apart; a misplaced label or weight is off by far more


def demo_settings(run_dir: Path, **values):
    return resolve({"preset": "demo", "run_dir": str(run_dir), "dtype": "fp32", **{k: str(v) for k, v in values.items()}},
                   environ={}, dotenv_path=Path("/nonexistent"))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """The demo's data stage in a fresh run folder, and the embedded model with LoRA whose B matrices are drawn at
    random (a fresh adapter is zero there, and would test nothing the base model doesn't)."""
    from cotune.backends import choose_backend, load_for_training
    from cotune.bench_cpu import random_lora_b
    from cotune.data import read_jsonl, run_data_stage
    from cotune.models import base_model_path

    run = tmp_path_factory.mktemp("held-out")
    s = demo_settings(run)
    run_data_stage(s)
    backend = choose_backend(s, quiet=True)
    backend.stack.patch()
    model, tokenizer = load_for_training(s, backend, base_model_path(s))
    random_lora_b(model)
    rows = read_jsonl(s.stage_dir("data") / "eval.jsonl")[:4]
    return s, backend, model, tokenizer, rows


def trainer_for(held_out, tmp_path, eval_batch: int, rows=None, **changes):
    from trl import SFTTrainer

    from cotune.distributed import plan
    from cotune.train import sft_config, trainer_class, training_dataset

    s, backend, model, tokenizer, fixture_rows = held_out
    s = dataclasses.replace(s, **changes)
    rows = fixture_rows if rows is None else rows
    config = sft_config(s, backend, plan(s, nproc_per_node=1, nnodes=1), "random", tmp_path / "ckpt",
                        eval_on_start=False, per_device_eval_batch_size=eval_batch)
    return trainer_class(SFTTrainer, "random")(model=model, args=config, train_dataset=training_dataset(rows, s),
                                                eval_dataset=training_dataset(rows, s), processing_class=tokenizer)


def opening_of(trainer) -> int:
    from cotune.train import eval_rows, shared_opening

    return shared_opening([row for batch in eval_rows(trainer) for row in batch])


@pytest.mark.slow
@pytest.mark.parametrize("eval_batch", [1, 3])
def test_the_shared_opening_gives_the_trainers_held_out_loss(held_out, tmp_path, eval_batch):
    """Batches of 3 over 4 rows: padded rows, and a last batch of one that the trainer weights by its size."""
    from cotune.train import held_out_loss, shared_opening_eval_loss

    trainer = trainer_for(held_out, tmp_path, eval_batch)
    assert opening_of(trainer) > 200  # the template's instructions, before the question: about half of each row
    expected = trainer.evaluate()["eval_loss"]
    trainer.model.train()
    loss = shared_opening_eval_loss(trainer)
    assert trainer.model.training  # left in the mode it was found in, as training goes on after it
    assert loss == pytest.approx(expected, rel=REL)
    assert held_out_loss(trainer, "cpu", distributed=False) == loss
    assert trainer.state.log_history[-1]["eval_loss"] == loss  # logged as evaluate() logs it


@pytest.mark.slow
def test_with_the_whole_text_learned_the_opening_is_scored_once(held_out, tmp_path):
    """COMPLETION_ONLY_LOSS=false: the opening's tokens carry labels too; they are scored once and count in every
    row."""
    from cotune.train import shared_opening_eval_loss

    trainer = trainer_for(held_out, tmp_path, 1, completion_only_loss=False)
    assert opening_of(trainer) > 200
    assert shared_opening_eval_loss(trainer) == pytest.approx(trainer.evaluate()["eval_loss"], rel=REL)


@pytest.mark.slow
def test_rows_that_share_nothing_are_evaluated_whole(held_out, tmp_path):
    """A first row that differs from the others from its first token: no opening is kept, the figure still holds."""
    from cotune.train import shared_opening_eval_loss

    rows = held_out[4]
    odd = dict(rows[0])
    odd["prompt"] = "Q: " + odd["prompt"]
    odd["text"] = "Q: " + odd["text"]
    trainer = trainer_for(held_out, tmp_path, 1, rows=[odd, *rows[1:2]])
    assert opening_of(trainer) == 0
    assert shared_opening_eval_loss(trainer) == pytest.approx(trainer.evaluate()["eval_loss"], rel=REL)


@pytest.mark.slow
def test_rows_that_share_part_of_their_answer_score_it_once(held_out, tmp_path):
    """Two rows with the same question and answers that part only near their end: the opening runs deep into the
    labelled answer, whose shared tokens are scored once for both rows."""
    from cotune.train import eval_rows, shared_opening_eval_loss

    rows = held_out[4]
    twin = dict(rows[0])
    twin["text"] = rows[0]["text"][:-40] + rows[1]["text"][-40:]
    trainer = trainer_for(held_out, tmp_path, 1, rows=[rows[0], twin])
    first_labelled = int((eval_rows(trainer)[0][0][1] != -100).nonzero()[0])
    assert opening_of(trainer) > first_labelled + 50
    assert shared_opening_eval_loss(trainer) == pytest.approx(trainer.evaluate()["eval_loss"], rel=REL)


def test_only_models_whose_every_layer_sees_every_position_keep_an_opening():
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    from cotune.models import full_attention_only

    assert full_attention_only(LlamaConfig()) and full_attention_only(Qwen3Config())
    assert not full_attention_only(MistralConfig(sliding_window=4096))
    assert not full_attention_only(Qwen3Config(use_sliding_window=True, sliding_window=4096, max_window_layers=2))
