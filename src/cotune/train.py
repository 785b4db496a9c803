"""The training stage: LoRA SFT through trl's SFTTrainer, with per-step metrics, held-out loss at the start and
the end, checkpoints that a rerun with the same settings resumes from, and an adapter written atomically."""
from __future__ import annotations

import dataclasses

import json
import math
import os
import shutil
import time
from pathlib import Path

from .distributed import Layout
from .errors import UserError, warn
from .files import atomic_path, sha256_file, write_json_atomic, write_run_record
from .settings import Settings, with_later_settings


def training_fingerprint(settings: Settings) -> dict:
    data = settings.stage_dir("data")
    return {"settings": settings.stage_settings("train"),
            "train_sha256": sha256_file(data / "train.jsonl"), "eval_sha256": sha256_file(data / "eval.jsonl")}


def describe_difference(old: dict, new: dict) -> str:
    changes = [f"{k.upper()} {old['settings'].get(k)!r} -> {v!r}" for k, v in new["settings"].items()
               if old["settings"].get(k) != v]
    if old.get("train_sha256") != new["train_sha256"] or old.get("eval_sha256") != new["eval_sha256"]:
        changes.append("the data stage's output changed")
    return "; ".join(changes) or "unknown difference"


def check_previous_run(settings: Settings, fingerprint: dict, world_size: int = 1) -> Path | None:
    """The checkpoint to resume from, None for a fresh start; refuses to mix runs made with other settings, and
    checkpoints saved by another number of processes unless ALLOW_WORLD_SIZE_CHANGE says so."""
    out = settings.stage_dir("train")
    checkpoints = out / "checkpoints"
    for label, recorded in (("a finished run", out / "fingerprint.json"),
                            ("checkpoints", checkpoints / "fingerprint.json")):
        if not recorded.is_file():
            continue
        old = with_later_settings(json.loads(recorded.read_text()), "train")
        if old == fingerprint:
            continue
        if settings.overwrite:
            warn(f"OVERWRITE=true: replacing {label} in {out} made with other settings ({describe_difference(old, fingerprint)})")
            shutil.rmtree(checkpoints, ignore_errors=True)
            for name in ("fingerprint.json", "run.json"):
                (out / name).unlink(missing_ok=True)
            return None
        raise UserError(f"{out} holds {label} made with other settings ({describe_difference(old, fingerprint)}); "
                        "use another RUN_DIR, restore the settings, or set OVERWRITE=true to replace it")
    resume_from = last_complete_checkpoint(checkpoints)
    if resume_from is not None:
        check_resume_world_size(resume_from, world_size, settings.allow_world_size_change)
    return resume_from


def checkpoint_world_size(checkpoint: Path) -> int | None:
    """How many processes saved a checkpoint, from the random states it holds: one file per process."""
    if (checkpoint / "rng_state.pth").is_file():
        return 1
    return len(list(checkpoint.glob("rng_state_*.pth"))) or None


def check_resume_world_size(checkpoint: Path, world_size: int, allowed: bool) -> None:
    """A checkpoint holds one random state per process: it resumes exactly only under as many processes."""
    saved_by = checkpoint_world_size(checkpoint)
    if saved_by is None or saved_by == world_size:
        return
    change = f"{checkpoint} was saved by {saved_by} training process(es) and this run has {world_size}"
    if not allowed:
        raise UserError(f"{change}: resume with {saved_by} (NPROC_PER_NODE x NNODES), or set "
                        f"ALLOW_WORLD_SIZE_CHANGE=true to go on with {world_size} (the same sequences per step; each "
                        "process's random state starts anew)")
    warn(f"ALLOW_WORLD_SIZE_CHANGE=true: {change}; going on with the same sequences per step, each process's "
         "random state starting anew")


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that was written whole: a kill while saving leaves one without its trainer state."""
    if not checkpoints.is_dir():
        return None
    found = sorted((p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for candidate in found:
        if (candidate / "trainer_state.json").is_file() and any(candidate.glob("adapter_model.*")):
            return candidate
        warn(f"{candidate} is incomplete (killed while saving?); skipping it")
    return None


def check_disk_for_checkpoints(settings: Settings, trainable_params: int) -> None:
    # Each checkpoint holds the adapter (fp32) and AdamW's two moments; two are kept, plus the final adapter.
    need = trainable_params * 4 * 3 * 3 + (200 << 20)
    free = shutil.disk_usage(settings.run_path).free
    if free < need:
        raise UserError(f"{settings.run_path}: {free / 2**20:.0f} MiB free, checkpoints need about "
                        f"{need / 2**20:.0f} MiB; free some disk or point RUN_DIR elsewhere")


class MetricsLog:
    """One JSON line per logging step (loss, learning rate, grad norm, tokens/s) plus the held-out evaluations."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if resume_step and path.is_file():  # a killed run may have logged past its last checkpoint
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        elif path.is_file():
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in kept))
        self.entries = [json.loads(line) for line in kept]
        self._last = (time.monotonic(), None)

    def write(self, entry: dict) -> None:
        self.entries.append(entry)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def on_log(self, step: int, logs: dict, tokens_seen: int | None = None) -> None:
        """`tokens_seen`: the real (non-pad) tokens trained so far, over all processes, as the trainer counts them."""
        if "loss" not in logs:
            return
        now, tokens = time.monotonic(), tokens_seen if tokens_seen else logs.get("num_tokens")
        last_time, last_tokens = self._last
        rate = None
        if tokens is not None and last_tokens is not None and now > last_time:
            rate = round((tokens - last_tokens) / (now - last_time), 1)
        self._last = (now, tokens)
        self.write({"step": step, "loss": logs["loss"], "learning_rate": logs.get("learning_rate"),
                    "grad_norm": logs.get("grad_norm"), "tokens_per_s": rate, "num_tokens": tokens,
                    "mean_token_accuracy": logs.get("mean_token_accuracy")})

    def eval_losses(self) -> dict:
        return {e["eval"]: e["eval_loss"] for e in self.entries if "eval" in e}


def plot_loss_curve(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in entries if "loss" in e]
    losses = [e["loss"] for e in entries if "loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, marker=".", label="training loss")
    evals = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
    if evals:
        # measured at these steps only (start and end): points, no line that would read as a measured curve
        ax.plot(*zip(*evals), marker="o", linestyle="none", label="held-out loss (where measured)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def assert_eos_is_learned(trainer, tokenizer) -> None:
    """The model only learns to stop if the final EOS keeps its label, even where pad == EOS."""
    batch = trainer.data_collator([trainer.train_dataset[0]])
    if "attention_mask" in batch:
        last = int(batch["attention_mask"][0].nonzero().max())
    else:  # padding-free batches (Unsloth turns them on): one row, no padding, the example ends the row
        last = batch["input_ids"].shape[1] - 1
    if batch["labels"][0].ne(-100).sum() == 0:
        raise RuntimeError("the collator masks every label; nothing would be learned")
    if int(batch["input_ids"][0, last]) != tokenizer.eos_token_id or int(batch["labels"][0, last]) == -100:
        raise RuntimeError("the collator masks the final EOS out of the labels; the model would never learn to stop")


def training_dataset(rows: list[dict], settings: Settings):
    """Whole texts (the reference recipe), or prompt/completion pairs when only the answer is learned."""
    from datasets import Dataset

    if settings.completion_only_loss:
        return Dataset.from_list([{"prompt": r["prompt"], "completion": r["text"][len(r["prompt"]):]} for r in rows])
    return Dataset.from_list([{"text": r["text"]} for r in rows])


def finished_run(settings: Settings, fingerprint: dict) -> dict | None:
    """The record of a training already finished with these settings and data (touched, so make sees it current)."""
    out = settings.stage_dir("train")
    if (out / "run.json").is_file() and (out / "fingerprint.json").is_file() and \
            with_later_settings(json.loads((out / "fingerprint.json").read_text()), "train") == fingerprint:
        print(f"{out}: already trained with these settings and data; nothing to do")
        (out / "run.json").touch()
        return json.loads((out / "run.json").read_text())
    return None


def preflight(settings: Settings, layout: Layout) -> dict | None:
    """What the launcher of N processes checks before starting any: a finished run (returned: nothing to start) and
    whether the checkpoints there may be resumed, so that these refusals are said once, before any model loads."""
    fingerprint = training_fingerprint(settings)
    done = finished_run(settings, fingerprint)
    if done is None:
        check_previous_run(settings, fingerprint, layout.world_size)
    return done


def score_labelled_positions_only() -> None:
    """trl's fused LM head projects only the positions that carry a label onto the vocabulary, but only where Triton
    runs (CUDA, XPU): elsewhere it scores every position, so that compiled devices (Neuron) keep one tile shape.
    On the CPU nothing is compiled, and with COMPLETION_ONLY_LOSS the prompt's positions (over half of each demo
    row) would cost the vocabulary projection, its softmax statistics and their backward for nothing. The loss,
    entropy and accuracy are the same either way (ignored positions are zeroed). trl decides this in one line,
    `compact = _use_triton(device)` in trl.trainer.utils, which this rebinds (private: a test pins it); a trl
    without it trains as it is, after a WARNING."""
    import trl
    import trl.trainer.utils as trl_utils

    from .cpu import answer_yes_on_the_cpu

    answer_yes_on_the_cpu(
        trl_utils, "_use_triton", lambda device: device,
        f"trl {trl.__version__} has no trl.trainer.utils._use_triton: on the CPU its loss projects every position "
        "onto the vocabulary, the prompt's too (the same loss, a slower step)")


EVAL_CHUNK = 512  # positions per forward: their logits are the memory the shared-opening evaluation holds


def held_out_loss(trainer, device: str, distributed: bool) -> float:
    """The held-out loss as `trainer.evaluate()` reports it. On the CPU, on one process, in fp32, the same figure is
    computed with the opening that every held-out row shares (the template's instructions: about half of each demo
    row) run once instead of once per row (`shared_opening_eval_loss`), and logged as evaluate() logs it. GPU runs,
    runs on several processes, runs under bf16 or fp16 autocast, and models with sliding-window or recurrent layers
    keep `trainer.evaluate()`."""
    from .models import full_attention_only

    args = trainer.args
    if device != "cpu" or distributed or args.bf16 or args.fp16 or not full_attention_only(trainer.model.config):
        return trainer.evaluate()["eval_loss"]
    loss = shared_opening_eval_loss(trainer)
    trainer.log({"eval_loss": loss})
    return loss


def eval_rows(trainer) -> list[list[tuple]]:
    """Per batch of the trainer's own eval dataloader (what `evaluate()` reads): each row's token ids and labels,
    padding removed."""
    batches = []
    for batch in trainer.get_eval_dataloader():
        mask = batch.get("attention_mask")
        keep = [mask[i].bool() if mask is not None else slice(None) for i in range(batch["input_ids"].shape[0])]
        batches.append([(batch["input_ids"][i][k], batch["labels"][i][k]) for i, k in enumerate(keep)])
    return batches


def shared_opening(rows: list[tuple]) -> int:
    """The positions every row's logits share: the opening P such that tokens and labels 0..P are the same in every
    row (the logits at positions 0..P-1 then score the same labels 1..P everywhere), short of each row's last token."""
    if not rows:
        return 0
    first_ids, first_labels = rows[0]
    opening = min(len(ids) for ids, _ in rows) - 1
    for ids, labels in rows:
        same = (ids[:opening + 1] == first_ids[:opening + 1]) & (labels[:opening + 1] == first_labels[:opening + 1])
        opening = min(opening, int(same.long().cumprod(0).sum()) - 1)
    return max(opening, 0)


def _score(model, cache, ids, labels, start: int, end: int) -> tuple[float, int]:
    """Feed positions start..end-1 on top of `cache` in pieces of EVAL_CHUNK: the summed negative log-likelihood of
    the labels they score (start+1..end, -100 skipped) and how many there were."""
    import torch

    nll, tokens = 0.0, 0
    for a in range(start, end, EVAL_CHUNK):
        b = min(a + EVAL_CHUNK, end)
        logits = model(input_ids=ids[a:b].unsqueeze(0), past_key_values=cache, use_cache=True).logits[0].float()
        targets = labels[a + 1:b + 1]
        keep = targets != -100
        logp = torch.log_softmax(logits[keep], dim=-1)
        nll -= float(logp.gather(-1, targets[keep].unsqueeze(-1)).sum())
        tokens += int(keep.sum())
    return nll, tokens


def shared_opening_eval_loss(trainer) -> float:
    """`trainer.evaluate()`'s eval_loss from the same batches, with the opening every row shares run once: its keys
    and values are kept and its labelled tokens scored once, and each row goes on from a copy of them, fed in pieces
    of EVAL_CHUNK positions through the model's own forward (so a model's logit scaling or capping applies). The loss
    is the trainer's: per batch, the labelled tokens' mean negative log-likelihood; over the batches, their mean
    weighted by rows."""
    import copy

    import torch
    from transformers import DynamicCache

    model = trainer.model
    batches = eval_rows(trainer)
    rows = [row for batch in batches for row in batch]
    if not rows:
        raise UserError("the held-out set is empty: nothing to evaluate")
    opening = shared_opening(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            kept = DynamicCache()
            shared = _score(model, kept, *rows[0], 0, opening)
            weighted = 0.0
            for batch in batches:
                nll, tokens = shared[0] * len(batch), shared[1] * len(batch)
                for ids, labels in batch:
                    row_nll, row_tokens = _score(model, copy.deepcopy(kept), ids, labels, opening, len(ids) - 1)
                    nll, tokens = nll + row_nll, tokens + row_tokens
                weighted += nll / max(tokens, 1) * len(batch)
    finally:
        model.train(was_training)
    return weighted / len(rows)


def sampling_strategy(split: str) -> str:
    """transformers' train_sampling_strategy behind a split: every split but `random` draws through its rank-aware
    batch_rebalance sampler."""
    return "random" if split == "random" else "batch_rebalance"


def trainer_class(base, split: str):
    """trl's SFTTrainer (Unsloth's, once Unsloth patched it) with what training on N processes needs: each step's
    sequences shared out as `split` says (cotune.sampling), drawn from the SEED (transformers passes its sampler
    none, so it would always draw with 42), and every process's random state saved into a checkpoint through rank 0,
    the only process that writes."""
    import random

    import numpy as np
    import torch
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    from .sampling import token_balanced

    class CotuneTrainer(base):
        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, BatchRebalanceSampler):
                sampler.seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                if split == "tokens":
                    sampler = token_balanced(sampler)
            return sampler

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None or self.args.world_size <= 1 or self.args.device.type != "cpu":
                return super()._load_optimizer_and_scheduler(checkpoint)
            # CPU processes: transformers loads onto args.device, "cpu:<rank>", a location torch.load can't restore
            from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

            self.optimizer.load_state_dict(torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu",
                                                      weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

        def _save_rng_state(self, output_dir):
            if self.args.world_size <= 1:
                return super()._save_rng_state(output_dir)
            import torch.distributed as dist

            state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
            if torch.cuda.is_available():
                state["cuda"] = torch.cuda.random.get_rng_state_all()
            states = [None] * self.args.world_size if self.args.process_index == 0 else None
            dist.gather_object(state, states, dst=0)
            if self.args.process_index == 0:
                os.makedirs(output_dir, exist_ok=True)
                for rank, rank_state in enumerate(states):
                    torch.save(rank_state, os.path.join(output_dir, f"rng_state_{rank}.pth"))

    return CotuneTrainer


def sft_config(settings: Settings, backend, layout: Layout, split: str, checkpoints: Path, eval_on_start: bool,
               **overrides):
    """trl's SFTConfig for the recipe, on one process or as one of N (its share of each step: `layout`). The
    training stage and the benchmark both build theirs here; `overrides` are what the benchmark sets otherwise
    (named where it calls)."""
    from trl import SFTConfig

    checkpointing = backend.stack.checkpointing(settings.gradient_checkpointing)
    config = dict(
        output_dir=str(checkpoints), max_length=settings.max_seq_length, dataset_text_field="text", packing=False,
        per_device_train_batch_size=layout.micro_batch, per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=layout.grad_accum, train_sampling_strategy=sampling_strategy(split),
        ddp_find_unused_parameters=False, warmup_steps=settings.warmup_steps,
        max_steps=settings.max_steps, learning_rate=settings.learning_rate, optim=backend.optim,
        weight_decay=settings.weight_decay, lr_scheduler_type=settings.lr_scheduler, seed=settings.seed,
        logging_steps=settings.logging_steps, save_strategy="steps", save_steps=settings.save_steps,
        save_total_limit=2, eval_strategy="no", eval_on_start=eval_on_start, report_to="none",
        bf16=backend.dtype == "bf16" or backend.autocast == "bf16", fp16=backend.dtype == "fp16",
        use_cpu=backend.device == "cpu",
        gradient_checkpointing=backend.stack.trainer_checkpointing and checkpointing is True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, dataset_num_proc=1,
        completion_only_loss=settings.completion_only_loss,
        # the trainer counts every process's real tokens itself: tokens/s on every stack (Unsloth's trainer logs
        # no num_tokens)
        include_num_input_tokens_seen="non_padding")
    unknown = set(overrides) - set(config) - {f.name for f in dataclasses.fields(SFTConfig)}
    if unknown:
        raise TypeError(f"not SFTConfig fields: {sorted(unknown)}")
    return SFTConfig(**{**config, **overrides})


def training_callback(process, metrics: MetricsLog | None, eval_on_start: bool):
    """Logs each step (rank 0), keeps the held-out loss taken at the start, and refuses to train N processes that
    DDP did not wrap (their gradients would never meet). Set `.trainer` once the trainer exists."""
    import torch
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        trainer = None
        pending_start = eval_on_start

        def on_train_begin(self, args, state, control, **kwargs):
            ddp = torch.nn.parallel.DistributedDataParallel
            wrapped = [self.trainer.model_wrapped, *getattr(self.trainer.accelerator, "_models", [])]
            if process.distributed and not any(isinstance(m, ddp) for m in wrapped):
                raise RuntimeError("training on several processes without DDP: their gradients would not be synced")

        def on_evaluate(self, args, state, control, **kwargs):
            result = kwargs.get("metrics") or {}
            if self.pending_start and "eval_loss" in result:
                self.pending_start = False
                if metrics is not None:
                    metrics.write({"eval": "start", "step": 0, "eval_loss": result["eval_loss"]})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if metrics is not None:
                metrics.on_log(state.global_step, logs or {}, state.num_input_tokens_seen)

    return Progress()


def quiet_progress() -> None:
    """Progress bars and info logs from one process only: the others would print each line again."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_train_stage(settings: Settings) -> dict | None:
    """Train on this process: alone, or as one of the N processes torchrun started (each with its own copy of the
    model on its own device; DDP averages their gradients). Rank 0 alone writes and returns the run record."""
    from .backends import choose_backend, load_for_training
    from .batchfit import fit_batch, keep_recomputed, memory_budget
    from .data import read_jsonl
    from .distributed import (decided_by_writer, end_process_group, gathered, on_every_process, plan,
                              start_process_group, this_process)
    from .models import base_model_path

    me = this_process()
    out = settings.stage_dir("train")
    data = settings.stage_dir("data")
    layout = plan(settings, nproc_per_node=me.local_world_size, nnodes=me.world_size // me.local_world_size)
    backend = choose_backend(settings, quiet=not me.is_writer, world_size=me.world_size)
    backend.stack.patch()  # before transformers, trl and peft are imported
    if not me.is_writer:
        quiet_progress()
    start_process_group(me, backend.device)
    train_rows, eval_rows, fingerprint = on_every_process(me, lambda: (
        read_jsonl(data / "train.jsonl"), read_jsonl(data / "eval.jsonl"), training_fingerprint(settings)))
    if len({json.dumps(f, sort_keys=True) for f in gathered(me, fingerprint)}) > 1:
        raise UserError(f"the training processes read different data or settings from {data}: every machine must "
                        "run the data stage with the same settings (or share RUN_DIR)")
    done = decided_by_writer(me, lambda: finished_run(settings, fingerprint))
    if done is not None:
        end_process_group()
        return done if me.is_writer else None
    resume_from = decided_by_writer(me, lambda: check_previous_run(settings, fingerprint, me.world_size))
    if resume_from is not None and not all(gathered(me, Path(resume_from).is_dir())):
        raise UserError(f"resuming from {resume_from}: some machines don't see it; a multi-machine run resumes only "
                        "from a RUN_DIR that every machine shares (same path)")

    model_path = base_model_path(settings)
    quiet = (lambda _m: None) if not me.is_writer else None
    budget = memory_budget(settings, backend, me.local_rank, warn_=quiet)
    model, tokenizer = load_for_training(settings, backend, model_path, device_index=me.local_rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the fitted micro-batch and accumulation train; the settings as given are what the run records
    fitted, fit, _ = fit_batch(settings, backend, model, [int(r.get("n_tokens") or 0) + 1 for r in train_rows], budget,
                               world_size=me.world_size, device_index=me.local_rank,
                               say=print if me.is_writer else (lambda _m: None), warn_=quiet)
    if fit is not None:
        layout = plan(fitted, nproc_per_node=me.local_world_size, nnodes=me.world_size // me.local_world_size)
    if settings.disk_check:
        decided_by_writer(me, lambda: check_disk_for_checkpoints(settings, trainable))

    from trl import SFTTrainer

    if backend.device == "cpu":
        score_labelled_positions_only()
    checkpoints = out / "checkpoints"
    metrics = None
    if me.is_writer:
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_json_atomic(checkpoints / "fingerprint.json", fingerprint)
        metrics = MetricsLog(out / "metrics.jsonl", int(resume_from.name.split("-")[-1]) if resume_from else 0)
    split = backend.stack.split
    start_eval = decided_by_writer(me, lambda: "start" not in metrics.eval_losses())
    # On N processes the held-out loss at the start is taken inside train(), once DDP wraps the model: an evaluate()
    # before train() marks the model prepared, train() then leaves it unwrapped, and the processes train apart
    # without syncing gradients (transformers 5.17 + accelerate 1.15, seen on gloo).
    eval_on_start = start_eval and me.distributed
    config = sft_config(fitted, backend, layout, split, checkpoints, eval_on_start)
    callback = training_callback(me, metrics, eval_on_start)
    callbacks = [callback, *keep_recomputed(model, fit)]
    trainer = trainer_class(SFTTrainer, split)(
        model=model, args=config, train_dataset=training_dataset(train_rows, settings),
        eval_dataset=training_dataset(eval_rows, settings), processing_class=tokenizer, callbacks=callbacks)
    callback.trainer = trainer
    assert_eos_is_learned(trainer, tokenizer)
    sampler = type(trainer._get_train_sampler()).__name__

    if start_eval and not eval_on_start:
        metrics.write({"eval": "start", "step": 0,
                       "eval_loss": held_out_loss(trainer, backend.device, me.distributed)})
    if resume_from and me.is_writer:
        print(f"resuming from {resume_from} (step {resume_from.name.split('-')[-1]} of {settings.max_steps})")
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.monotonic() - started
    if callback.pending_start and me.is_writer:
        warn("the held-out loss at the start was not taken (this trainer skipped eval_on_start); the record has none")
    end_loss = held_out_loss(trainer, backend.device, me.distributed)
    if not me.is_writer:
        end_process_group()
        return None
    metrics.write({"eval": "end", "step": trainer.state.global_step, "eval_loss": end_loss})

    with atomic_path(out / "adapter") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    trainer.state.save_to_json(str(out / "trainer_state.json"))
    plot_loss_curve(metrics.entries, out / "loss.png")
    evals = metrics.eval_losses()
    losses = [e["loss"] for e in metrics.entries if "loss" in e]
    rates = [e["tokens_per_s"] for e in metrics.entries if e.get("tokens_per_s")]
    summary = {
        "backend": backend.name, "device": backend.device, "dtype": backend.dtype, "autocast": backend.autocast,
        "load_in_4bit": backend.load_in_4bit, "optim": backend.optim, "global_step": trainer.state.global_step,
        "trainable_params": trainable,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "eval_loss_start": evals.get("start"), "eval_loss_end": evals.get("end"),
        "perplexity_start": math.exp(evals["start"]) if "start" in evals else None,
        "perplexity_end": math.exp(evals["end"]) if "end" in evals else None,
        "median_tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
        "train_seconds_this_process": round(train_seconds, 1), "resumed_from": str(resume_from) if resume_from else None,
        "batch_fit": fit,
        "processes": {**layout.record(), "split": split, "sampler": sampler,
                      "backend": ("nccl" if backend.device == "cuda" else "gloo") if me.distributed else None},
    }
    write_json_atomic(out / "fingerprint.json", fingerprint)
    record = write_run_record(out, settings.public_dict(),
                              {"train": data / "train.jsonl", "eval": data / "eval.jsonl", "base_model": model_path},
                              {"adapter": out / "adapter", "metrics": out / "metrics.jsonl", "loss_curve": out / "loss.png"},
                              extra={"summary": summary})
    end_process_group()
    return record
