"""The plain stack's CPU speed-ups (cotune.cpu) on the real embedded model: the same answers and the same training
loss with each of them, and the decision to use the transposed products taken from a measurement on this CPU."""
import re

import pytest

from conftest import ROOT, run_script, script_env

QUESTIONS = ("1990年五月初八午时生人，女，想了解事业运势", "2001年腊月十二卯时生人，男，想了解财运",
             "今年的感情运势如何？")


@pytest.fixture(scope="module")
def model_and_prompts():
    import torch
    from transformers import AutoModelForCausalLM

    from cotune.models import load_tokenizer, resolve_model_path
    from cotune.prompts import load_template
    from cotune.settings import EMBEDDED_MODEL

    path = resolve_model_path(EMBEDDED_MODEL)
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"
    template = load_template("fortune_cot")
    batch = tokenizer([template.prompt(q) for q in QUESTIONS], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    return model, tokenizer, batch


def greedy(model, tokenizer, batch, tokens=24):
    import torch

    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)


def attention_kernels(model, tokenizer, batch) -> set[str]:
    """The SDPA kernels that ran while the model answered with a few greedy steps (prefill and decoding)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        greedy(model, tokenizer, batch, tokens=3)
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product_")}


def test_the_transposed_product_is_the_same_product_and_wider_inputs_keep_torchs_own(model_and_prompts):
    import torch
    import torch.nn.functional as F

    from cotune.cpu import SKINNY_ROWS, _skinny_forward

    model, _, _ = model_and_prompts
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 211  # 7 projections x 30 layers, and the LM head
    torch.manual_seed(0)
    for module in (linears[0], linears[4], linears[-1]):
        k = module.weight.shape[1]
        for shape in ((3, 1, k), (2, k), (1, SKINNY_ROWS, k)):
            x = torch.randn(*shape)
            with torch.no_grad():
                got, want = _skinny_forward(module, x), F.linear(x, module.weight, module.bias)
            assert got.shape == want.shape and got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        wide = torch.randn(1, SKINNY_ROWS + 1, k)  # prefill and training: exactly torch's own path
        with torch.no_grad():
            assert torch.equal(_skinny_forward(module, wide), F.linear(wide, module.weight, module.bias))
    biased = torch.nn.Linear(8, 5, bias=True)
    for shape in ((3, 8), (2, 1, 8), (8,)):  # a bias, and a 1-D input (torch's own path)
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(_skinny_forward(biased, x), biased(x), rtol=1e-6, atol=1e-6)


def test_the_products_are_wrapped_only_where_this_cpu_measured_them_faster_and_answers_do_not_change(
        model_and_prompts, monkeypatch):
    import torch

    from cotune import cpu
    from cotune.cpu import faster_decoding_products

    model, tokenizer, batch = model_and_prompts
    before = greedy(model, tokenizer, batch)

    def wrapped():
        return [m for m in model.modules() if type(m) is torch.nn.Linear and "forward" in m.__dict__]

    try:
        line = faster_decoding_products(model, rows=3)
        assert "by the (49152, 576) matrix" in line, line
        stock, transposed = map(float, re.search(r"x @ W\.T ([\d.]+) ms, \(W @ x\.T\)\.T ([\d.]+) ms", line).groups())
        assert len(wrapped()) == (211 if line.startswith("decoding products: (W @ x.T).T in 211") else 0), line
        if abs(transposed / stock - 0.8) > 0.05:  # the choice follows the timings it prints (rounded to 0.1 ms)
            assert bool(wrapped()) == (transposed < 0.8 * stock), line
        assert torch.equal(greedy(model, tokenizer, batch), before)
        assert faster_decoding_products(model, rows=17) == "decoding products: torch's own"
    finally:
        for module in wrapped():
            del module.forward
    # the wrapped path answers the same wherever the timing would choose it
    monkeypatch.setattr(cpu, "transposed_product_is_faster", lambda weight, rows: (True, 2e-3, 1e-3))
    try:
        assert faster_decoding_products(model, rows=3).startswith("decoding products: (W @ x.T).T in 211")
        assert len(wrapped()) == 211 and torch.equal(greedy(model, tokenizer, batch), before)
        # the decoding steps' attention stays on SDPA's fused CPU kernel: its math fallback, taken for strided
        # queries, copies the key/value heads and cost a quarter of a step
        assert attention_kernels(model, tokenizer, batch) == {"aten::_scaled_dot_product_flash_attention_for_cpu"}
    finally:
        for module in wrapped():
            del module.forward


def test_attention_groups_heads_itself_on_the_cpu_with_the_same_answers_and_loss(model_and_prompts, monkeypatch):
    import torch
    import transformers.integrations.sdpa_attention as sdpa

    from cotune.cpu import gqa_attention_without_copies

    model, tokenizer, batch = model_and_prompts
    # transformers' own rule, also where an earlier test in this process loaded a model on the CPU; restored after
    stock_rule = getattr(sdpa.use_gqa_in_sdpa, "cotune_original", sdpa.use_gqa_in_sdpa)
    monkeypatch.setattr(sdpa, "use_gqa_in_sdpa", stock_rule)
    key = torch.zeros(1, 3, 8, 64)
    assert sdpa.use_gqa_in_sdpa(torch.ones(1, 1, 8, 8, dtype=torch.bool), key, key) is False  # transformers' rule

    def loss_and_grad():
        model.zero_grad(set_to_none=True)
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        return loss.item(), model.model.layers[0].self_attn.k_proj.weight.grad.clone()

    copies = []
    repeat_kv = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda *a: copies.append(1) or repeat_kv(*a))
    stock_tokens, (stock_loss, stock_grad) = greedy(model, tokenizer, batch), loss_and_grad()
    assert copies  # transformers' own rule copies the heads: the batch is left-padded, so a mask is passed
    copies.clear()
    gqa_attention_without_copies()
    gqa_attention_without_copies()  # a second call changes nothing
    assert sdpa.use_gqa_in_sdpa(torch.ones(1, 1, 8, 8, dtype=torch.bool), key, key) is True
    assert torch.equal(greedy(model, tokenizer, batch), stock_tokens)
    loss, grad = loss_and_grad()
    model.zero_grad(set_to_none=True)
    assert not copies  # SDPA grouped the heads itself, in generation and in training
    assert abs(loss - stock_loss) < 1e-6
    torch.testing.assert_close(grad, stock_grad, rtol=1e-4, atol=1e-6)


def test_without_the_private_rule_attention_copies_as_before_and_says_so(monkeypatch, capsys):
    import transformers.integrations.sdpa_attention as sdpa

    from cotune.cpu import gqa_attention_without_copies

    monkeypatch.delattr(sdpa, "use_gqa_in_sdpa")
    gqa_attention_without_copies()
    err = capsys.readouterr().err
    assert err.startswith("WARNING: transformers ") and "use_gqa_in_sdpa" in err, err


def test_the_cpu_speedups_benchmark_prints_each_variant_side_by_side(tmp_path):
    import json

    proc = run_script("bench", "--cpu-speedups", "--new-tokens", "4", "--steps", "1", "--eval-rows", "2",
                      "--run-dir", str(tmp_path), env=script_env(tmp_path), check=True)
    result = json.loads((tmp_path / "bench" / "cpu-speedups.json").read_text())
    assert list(result["decode"]) == ["stock", "gqa", "gqa+products-strided", "products", "gqa+products"]
    assert all(r["same_tokens_as_stock"] and r["seconds"] > 0 for r in result["decode"].values()), result
    assert list(result["train"]) == ["stock", "gqa", "gqa+lora-addmm"]
    assert all(abs(r["loss_minus_stock"]) < 1e-5 and r["median_step_s"] > 0 for r in result["train"].values())
    assert result["train_tokens_per_step"] > 500 and result["lm_head_ms"]["x @ W.T"] > 0
    held = result["held_out"]
    assert held["rows"] == 2 and held["tokens"] > 1000 and held["opening"] > 200
    ways = held["ways"]
    assert list(ways) == ["trainer.evaluate()", "shared opening"] and all(w["seconds"] > 0 for w in ways.values())
    assert ways["shared opening"]["loss"] == pytest.approx(ways["trainer.evaluate()"]["loss"], rel=1e-5)
    assert "| gqa+products |" in proc.stdout and "| shared opening |" in proc.stdout
    assert (tmp_path / "bench" / "cpu-speedups.md").read_text() in proc.stdout


@pytest.mark.parametrize("omp", ["1", "3", "", "many"])
def test_llama_cpp_takes_its_threads_from_omp_num_threads_else_the_cores(omp):
    """Two processes that each spin a llama.cpp thread per core slow each other down many times over; a thread
    count given in OMP_NUM_THREADS (as torch reads it) holds for llama.cpp too."""
    import subprocess
    import sys

    code = ("import os; from cotune.models import embedded_gguf_path; from cotune.verify import load_gguf; "
            "llm, _ = load_gguf(embedded_gguf_path(), 64, gpu=False); "
            "print(llm.context_params.n_threads, llm.context_params.n_threads_batch, len(os.sched_getaffinity(0)))")
    env = script_env(OMP_NUM_THREADS=omp)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads, threads_batch, cores = map(int, proc.stdout.split()[-3:])
    assert threads == threads_batch == (int(omp) if omp.isdigit() else cores)


def test_each_training_process_gets_its_share_of_the_cores_it_may_use_not_of_the_machine():
    """torchrun's processes on one node split the cores among themselves through OMP_NUM_THREADS; under a CPU set (a
    container's, a job's) that is the set's cores, not the machine's."""
    import os
    import subprocess
    import sys

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs a machine with 2 or more cores, to hold a process to fewer than all of them")
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from cotune.cpu import threads_per_process; "
            "print(threads_per_process(1), threads_per_process(2), threads_per_process(0), os.cpu_count())")
    proc = subprocess.run([sys.executable, "-c", code], env=script_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two, none, machine = map(int, proc.stdout.split())
    assert (one, two, none) == (1, 1, 1) and machine >= 2


@pytest.mark.parametrize("alpha, dropout", [(16, 0.0), (32, 0.1)])
def test_the_lora_update_inside_the_product_trains_as_peft_does(model_and_prompts, alpha, dropout):
    """The same loss and gradients as peft's own forward, on the real model with a non-zero adapter: with a scale
    other than 1 and with dropout (the same masks drawn in the same order); peft's forward again when the adapter
    is switched off."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cotune.bench_cpu import random_lora_b
    from cotune.cpu import lora_update_in_the_product
    from cotune.models import resolve_model_path
    from cotune.settings import EMBEDDED_MODEL

    _, _, batch = model_and_prompts
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(EMBEDDED_MODEL), dtype=torch.float32,
                                                use_safetensors=True)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    random_lora_b(model)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def loss_and_grads():
        model.train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    stock_loss, stock_grads = loss_and_grads()
    assert lora_update_in_the_product(model) == 210  # 7 projections x 30 layers
    loss, grads = loss_and_grads()
    assert loss == pytest.approx(stock_loss, rel=1e-6)
    assert grads.keys() == stock_grads.keys() and len(grads) == 420
    for name, grad in grads.items():  # to within 1e-4 of the largest entry: summed in another order, not other sums
        want = stock_grads[name]
        assert want.abs().max() > 0, name
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=name)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        off = model(**batch).logits
        lora_update_in_the_product(model, on=False)
        stock_off = model(**batch).logits
    assert torch.equal(off, stock_off)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_the_plain_stack_trains_on_the_cpu_with_the_update_inside_the_product():
    from cotune.backends import choose_backend, load_for_training
    from cotune.models import resolve_model_path
    from cotune.settings import resolve

    settings = resolve({"preset": "demo"}, environ={}, dotenv_path=ROOT / "no-such.env")
    backend = choose_backend(settings, quiet=True)
    assert backend.device == "cpu"
    model, _ = load_for_training(settings, backend, resolve_model_path(settings.base_model))
    wrapped = [name for name, m in model.named_modules() if "forward" in m.__dict__]
    assert len(wrapped) == 210 and all(name.endswith("_proj") for name in wrapped), wrapped[:3]


def test_under_bf16_autocast_peft_computes_the_update_as_before():
    """Under autocast (CPUs with AMX) one addmm rounds otherwise than peft's three bf16 steps: peft's forward runs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cotune.bench_cpu import random_lora_b
    from cotune.cpu import lora_update_in_the_product
    from cotune.models import resolve_model_path
    from cotune.settings import EMBEDDED_MODEL

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(EMBEDDED_MODEL), dtype=torch.float32,
                                                 use_safetensors=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "o_proj", "down_proj"],
                                             task_type="CAUSAL_LM"))
    random_lora_b(model)
    ids = torch.arange(100, 164).unsqueeze(0)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    stock_loss, stock_grads = loss_and_grads()
    assert lora_update_in_the_product(model) == 90
    loss, grads = loss_and_grads()
    assert loss == stock_loss and all(torch.equal(g, s) for g, s in zip(grads, stock_grads))
