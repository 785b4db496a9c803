"""`bench.py --cpu-speedups`: the three CPU speed-ups of `cotune.cpu`, each off and on, side by side in one process on
the embedded model: greedy decoding of the demo's three questions (the after stage's work) and LoRA training steps
on two sample rows in the training prompt form; then the training stage's held-out loss on the CPU, trl's
`trainer.evaluate()` against the shared opening run once (`cotune.train.shared_opening_eval_loss`), on the demo's
held-out rows. Writes RUN_DIR/bench/cpu-speedups.json and .md."""
from __future__ import annotations

import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

# "gqa+products-strided": both as first shipped, the transposed products returning a transposed view (kept to show
# what the contiguous result is worth: a strided query sends SDPA to its math fallback, which copies the grouped heads)
DECODE_VARIANTS = ("stock", "gqa", "gqa+products-strided", "products", "gqa+products")
TRAIN_VARIANTS = ("stock", "gqa", "gqa+lora-addmm")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class _Switches:
    """Turn each speed-up on and off in one process: transformers' GQA rule, the wrapped linear layers and, once
    `lora` is set, the LoRA layers' update."""

    def __init__(self, model):
        import transformers.integrations.sdpa_attention as sdpa

        from .cpu import cpu_linears, gqa_attention_without_copies

        gqa_attention_without_copies()
        self.sdpa = sdpa
        self.gqa_rule = sdpa.use_gqa_in_sdpa
        self.stock_rule = self.gqa_rule.cotune_original  # transformers' own, even where this process rebound it
        self.linears = cpu_linears(model)
        self.lora = None

    def set(self, variant: str) -> None:
        import types

        from .cpu import lora_update_in_the_product, skinny_products

        self.sdpa.use_gqa_in_sdpa = self.gqa_rule if "gqa" in variant else self.stock_rule
        skinny_products(self.linears, "products" in variant)
        if self.lora is not None:
            lora_update_in_the_product(self.lora, "lora-addmm" in variant)
        if variant.endswith("-strided"):
            for module in self.linears:
                module.forward = types.MethodType(_strided_skinny_forward, module)


def _strided_skinny_forward(self, x):
    """`cotune.cpu`'s transposed product as it was first shipped: the result left as a transposed view."""
    from .cpu import SKINNY_ROWS

    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_ROWS or x.dim() < 2 or self.bias is not None:
        import torch.nn.functional as F

        return F.linear(x, self.weight, self.bias)
    return (self.weight @ x.reshape(rows, x.shape[-1]).T).T.reshape(*x.shape[:-1], self.weight.shape[0])


def cpu_speedups(out: Path, new_tokens: int = 128, steps: int = 4, repeats: int = 2, eval_rows: int = 8) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from .cpu import transposed_product_is_faster
    from .data import read_jsonl
    from .models import load_tokenizer, resolve_model_path
    from .prompts import load_template
    from .settings import EMBEDDED_MODEL, REFERENCE_QUESTION, resolve

    settings = resolve({"preset": "demo"}, environ={}, dotenv_path=Path("/nonexistent"))
    path = resolve_model_path(EMBEDDED_MODEL)
    tokenizer = load_tokenizer(path)
    template = load_template(settings.template)
    rows = read_jsonl(Path(__file__).parent / "samples" / "fortune_sample.jsonl")
    prompts = [template.prompt(q) for q in [REFERENCE_QUESTION, rows[40]["Question"], rows[41]["Question"]]]
    texts = [template.training_text(r["Question"], r["Complex_CoT"], r["Response"], tokenizer.eos_token)
             for r in rows[:2]]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    switches = _Switches(model)
    result = {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model": EMBEDDED_MODEL, "new_tokens": new_tokens, "decode": {}, "train": {}}

    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    head = model.get_output_embeddings().weight.detach()
    _, stock, transposed = transposed_product_is_faster(head, len(prompts))
    result["lm_head_ms"] = {"x @ W.T": round(stock * 1e3, 2), "(W @ x.T).T": round(transposed * 1e3, 2)}
    outputs = {}
    for _ in range(repeats):  # interleaved, so that a slower minute of the machine hits every variant alike
        for variant in DECODE_VARIANTS:
            switches.set(variant)
            with torch.no_grad():
                start = time.perf_counter()
                tokens = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False, pad_token_id=tokenizer.pad_token_id)
                seconds = time.perf_counter() - start
            outputs[variant] = tokens
            best = result["decode"].get(variant, {}).get("seconds", float("inf"))
            result["decode"][variant] = {"seconds": round(min(best, seconds), 3),
                                         "ms_per_step": round(min(best, seconds) / new_tokens * 1e3, 1)}
    for variant in DECODE_VARIANTS:
        result["decode"][variant]["same_tokens_as_stock"] = bool(torch.equal(outputs[variant], outputs["stock"]))

    tokenizer.padding_side = "right"
    train_batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = train_batch["input_ids"].masked_fill(train_batch["attention_mask"] == 0, -100)
    switches.set("stock")
    lora = get_peft_model(model, LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                                            target_modules=list(settings.target_modules), task_type="CAUSAL_LM"))
    lora.train()
    switches.lora = lora
    random_lora_b(lora)  # a trained adapter's B is not zero: its update then takes part in every product
    result["train_tokens_per_step"] = int(train_batch["attention_mask"].sum())
    losses = {}
    for _ in range(repeats):
        for variant in TRAIN_VARIANTS:
            switches.set(variant)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                loss = lora(**train_batch, labels=labels).loss
                loss.backward()
                lora.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
            losses[variant] = loss.item()
            best = result["train"].get(variant, {}).get("median_step_s", float("inf"))
            result["train"][variant] = {"median_step_s": round(min(best, sorted(times)[len(times) // 2]), 3)}
    for variant in TRAIN_VARIANTS:
        result["train"][variant]["loss_minus_stock"] = losses[variant] - losses["stock"]

    switches.set("gqa+lora-addmm")  # as the training stage runs on the CPU
    # in fp32: under bf16 autocast (CPUs with AMX) the training stage keeps trainer.evaluate()
    result["held_out"] = held_out_loss_timings(lora, tokenizer, dataclasses.replace(settings, dtype="fp32"), template,
                                               rows[40:40 + eval_rows], repeats)

    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu-speedups.json").write_text(json.dumps(result, indent=1))
    (out / "cpu-speedups.md").write_text(table(result))
    return result


def random_lora_b(model, seed: int = 0) -> None:
    """Draw every LoRA B matrix of `model` at random (N(0, 0.02²), from `seed`), as a trained adapter has them: a
    fresh adapter's B is zero, and so is its update."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def held_out_loss_timings(lora, tokenizer, settings, template, rows: list[dict], repeats: int) -> dict:
    """The held-out loss of `rows` both ways, interleaved, through a trainer built as the training stage builds it,
    with `lora` as it comes (`cpu_speedups` has drawn its B matrices at random: a fresh adapter is zero there)."""
    from trl import SFTTrainer

    from .backends import choose_backend
    from .distributed import plan
    from .train import eval_rows, shared_opening, shared_opening_eval_loss, sft_config, trainer_class, training_dataset

    rendered = [{"prompt": template.prompt(r["Question"]),
                 "text": template.training_text(r["Question"], r["Complex_CoT"], r["Response"], tokenizer.eos_token)}
                for r in rows]
    with tempfile.TemporaryDirectory() as scratch:  # the trainer's output folder, which evaluating leaves empty
        config = sft_config(settings, choose_backend(settings, quiet=True), plan(settings, nproc_per_node=1, nnodes=1),
                            "random", Path(scratch), eval_on_start=False, save_strategy="no")
        dataset = training_dataset(rendered, settings)
        trainer = trainer_class(SFTTrainer, "random")(model=lora, args=config, train_dataset=dataset,
                                                      eval_dataset=dataset, processing_class=tokenizer)
        flat = [row for batch in eval_rows(trainer) for row in batch]
        ways = {"trainer.evaluate()": lambda: trainer.evaluate()["eval_loss"],
                "shared opening": lambda: shared_opening_eval_loss(trainer)}
        timings, losses = {}, {}
        for _ in range(repeats):
            for way, run in ways.items():
                start = time.perf_counter()
                losses[way] = run()
                timings[way] = min(timings.get(way, float("inf")), time.perf_counter() - start)
    return {"rows": len(flat), "tokens": sum(len(ids) for ids, _ in flat), "opening": shared_opening(flat),
            "ways": {way: {"seconds": round(timings[way], 3), "loss": losses[way]} for way in ways}}


def table(result: dict) -> str:
    stock_decode = result["decode"]["stock"]["seconds"]
    stock_train = result["train"]["stock"]["median_step_s"]
    lines = [f"CPU speed-ups on {result['cpu']}, {result['threads']} threads, torch {result['torch']}, "
             f"{result['model']} in fp32.", "",
             f"Decoding: 3 questions side by side, {result['new_tokens']} greedy steps (best of the interleaved runs).",
             "", "| variant | seconds | ms per step | vs stock | same tokens |", "|---|---|---|---|---|"]
    for variant, r in result["decode"].items():
        lines.append(f"| {variant} | {r['seconds']:.2f} | {r['ms_per_step']:.0f} | {stock_decode / r['seconds']:.2f}x "
                     f"| {'yes' if r['same_tokens_as_stock'] else 'NO'} |")
    head = result["lm_head_ms"]
    lines += ["", f"The LM head alone, 3 rows: x @ W.T {head['x @ W.T']} ms, (W @ x.T).T {head['(W @ x.T).T']} ms.", "",
              f"Training: forward and backward of 2 rows ({result['train_tokens_per_step']} tokens), LoRA r=16 on "
              "every projection (median step, best of the interleaved runs).", "",
              "| variant | median step (s) | vs stock | loss minus stock's |", "|---|---|---|---|"]
    for variant, r in result["train"].items():
        lines.append(f"| {variant} | {r['median_step_s']:.3f} | {stock_train / r['median_step_s']:.2f}x "
                     f"| {r['loss_minus_stock']:.2e} |")
    held = result["held_out"]
    ways = held["ways"]
    slow = ways["trainer.evaluate()"]
    lines += ["", f"Held-out loss as the training stage takes it: {held['rows']} rows, {held['tokens']} tokens, of which "
              f"{held['opening']} open every row (best of the interleaved runs).", "",
              "| way | seconds | vs trainer.evaluate() | loss minus trainer.evaluate()'s |", "|---|---|---|---|"]
    for way, r in ways.items():
        lines.append(f"| {way} | {r['seconds']:.2f} | {slow['seconds'] / r['seconds']:.2f}x "
                     f"| {r['loss'] - slow['loss']:.2e} |")
    return "\n".join(lines) + "\n"
