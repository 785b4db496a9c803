"""Three speed-ups for the plain stack on the CPU, each the same computation, measured in docs/benchmarks.md
(`scripts/bench.py --cpu-speedups` prints the figures):

- Grouped-query attention without copies. transformers copies every key and value head out to the query heads
  (`repeat_kv`) before PyTorch's SDPA whenever an attention mask is passed, which it always is for left-padded
  generation and padded training batches, because on CUDA SDPA's fast kernels refuse `enable_gqa` with a mask. The CPU
  kernel takes both: the copy is pure cost there, and while decoding it grows with the cache, every layer, every step.
- Decoding's skinny matrix products. A decoding step multiplies a few rows (one per question) by every weight
  matrix. On some CPUs MKL runs `x @ W.T` at that shape well below memory speed, and `(W @ x.T).T`, the same products
  summed in another order, twice as fast. Which form is faster is measured on this CPU, on the model's own largest
  matrix, before any weight is wrapped; unless the transposed form takes at most 80 % of the stock form's time,
  nothing changes. The result is copied into a contiguous tensor (a few kB): left as the transposed view, it sent
  every query down SDPA's math fallback, which copies the grouped key/value heads (111 against 84 ms a step on the
  EPYC). Summed in another order, a product can differ in its last bits, so on a near-tie between two tokens greedy
  decoding may pick the other one; the ask stage records which form ran.
- LoRA's update inside the base layer's product. peft adds a LoRA layer's update as `result + B(A(x)) * scaling`:
  the update written out in full, scaled in a second pass over it and added in a third, in the forward and again in
  the backward. `torch.addmm(result, A(x) * scaling, B.T)` scales the r-wide intermediate instead and adds the
  update inside the product, one pass (a training step 1.10x faster than with the grouped heads alone on the
  EPYC). peft's own forward still runs wherever its case is not the plain one (several or disabled adapters, DoRA,
  a bias on B, mixed dtypes, autocast).
"""
from __future__ import annotations

import os
import time
import types

from .errors import warn


def cpu_threads() -> int:
    """The threads cotune's own CPU work uses (llama.cpp's, the converter's): OMP_NUM_THREADS where it is set to a
    number, the convention torch follows too, else the cores this process may run on. Two processes that each spin
    a thread per core of the machine, llama.cpp's way, slow each other down many times over."""
    try:
        wanted = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        wanted = 0
    return wanted if wanted > 0 else usable_cores()


def usable_cores() -> int:
    """The cores this process may run on: its CPU set where the system has one (a container's, a job's), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_process(processes: int) -> int:
    """Each of `processes` processes' share of the cores this one may use (at least one): torchrun's training
    processes on one node get it as their OMP_NUM_THREADS. Counting the machine's cores instead would give every
    process of a job held to a few of them as many threads as the whole machine has."""
    return max(1, usable_cores() // max(1, processes))


def _lora_update_in_the_product(self, x, *args, **kwargs):
    """A peft LoRA Linear's forward: `base(x) + B(A(dropout(x))) * scaling` as one `addmm` for the update, in the
    plain case (one active adapter, plain LoRA, no bias on B, one dtype, no autocast); peft's own forward otherwise."""
    import torch

    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    if (args or kwargs or name is None or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    # one dtype, no autocast: under bf16 autocast (CPUs with AMX) the two forms round differently, 0.04 % of the loss
    # apart on the embedded model, so there peft's own runs
    if (torch.is_autocast_enabled(x.device.type)
            or not x.dtype == lora_A.weight.dtype == lora_B.weight.dtype == self.base_layer.weight.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    update_in = lora_A(self.lora_dropout[name](x)) * self.scaling[name]
    out = torch.addmm(result.reshape(-1, result.shape[-1]), update_in.reshape(-1, update_in.shape[-1]), lora_B.weight.T)
    return out.view(result.shape)


def lora_update_in_the_product(model, on: bool = True) -> int:
    """Give every peft LoRA layer of `model` whose base is a plain linear layer on the CPU the one-pass update
    (`_lora_update_in_the_product`), or peft's forward again (`on` False); how many layers that was."""
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = [m for m in model.modules() if type(m) is LoraLinear and type(m.base_layer) is torch.nn.Linear
              and m.base_layer.weight.device.type == "cpu"]
    _bind_forward(layers, _lora_update_in_the_product, on)
    return len(layers)


def _bind_forward(modules, forward, on: bool) -> None:
    """Give each module `forward` as its own (on), or drop it so that its class's forward runs again."""
    for module in modules:
        if on:
            module.forward = types.MethodType(forward, module)
        else:
            module.__dict__.pop("forward", None)


SKINNY_ROWS = 16  # decoding steps (one row per question); prefill and training products keep torch's own path


def answer_yes_on_the_cpu(module, name: str, device_of, missing: str) -> None:
    """Rebind `module.name`, a library's private yes/no rule, so that it says yes for work on the CPU and asks the
    library's own rule elsewhere; `device_of` picks the device from the rule's arguments. The library's rule stays on
    the new one as `cotune_original`, and a second call changes nothing. Where the library has no such rule, this
    prints `missing` as a WARNING and leaves everything as it is."""
    rule = getattr(module, name, None)
    if rule is None:
        warn(missing)
        return
    if hasattr(rule, "cotune_original"):
        return

    def on_the_cpu_too(*args, **kwargs) -> bool:
        return device_of(*args, **kwargs).type == "cpu" or rule(*args, **kwargs)

    on_the_cpu_too.cotune_original = rule
    setattr(module, name, on_the_cpu_too)


def gqa_attention_without_copies() -> None:
    """Let SDPA group the key/value heads itself on CPU tensors, mask or not (transformers'
    `use_gqa_in_sdpa`, which this rebinds: private, a test pins it). CUDA keeps transformers' own rule."""
    import transformers
    import transformers.integrations.sdpa_attention as sdpa

    answer_yes_on_the_cpu(
        sdpa, "use_gqa_in_sdpa", lambda attention_mask, key, *args, **kwargs: key.device,
        f"transformers {transformers.__version__} has no integrations.sdpa_attention.use_gqa_in_sdpa: on the CPU, "
        "attention copies every key and value head per query head (the same result, a slower step)")


def _best_seconds(fn, tries: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def transposed_product_is_faster(weight, rows: int = 3) -> tuple[bool, float, float]:
    """(whether `(W @ x.T).T` takes at most 80 % of `F.linear(x, W)`'s time here, seconds of each) for `rows` rows."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
    with torch.no_grad():
        stock = _best_seconds(lambda: F.linear(x, weight))
        transposed = _best_seconds(lambda: (weight @ x.T).T.contiguous())
    return transposed < 0.8 * stock, stock, transposed


def _skinny_forward(self, x):
    import torch.nn.functional as F

    rows = x.numel() // x.shape[-1]
    if rows > SKINNY_ROWS or x.dim() < 2:
        return F.linear(x, self.weight, self.bias)
    # contiguous: a transposed view would send what follows down strided paths, SDPA to its math fallback, which
    # copies the grouped key/value heads out to the query heads (a quarter of a decoding step on the EPYC, measured)
    y = (self.weight @ x.reshape(rows, x.shape[-1]).T).T.contiguous()
    if self.bias is not None:
        y = y + self.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], self.weight.shape[0])


def skinny_products(linears, on: bool) -> None:
    """Run these linear layers' products of at most SKINNY_ROWS rows as `(W @ x.T).T` (on), or torch's way again."""
    _bind_forward(linears, _skinny_forward, on)


def cpu_linears(model) -> list:
    import torch

    return [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"]


def faster_decoding_products(model, rows: int) -> str:
    """Wrap the model's linear layers so that products of at most SKINNY_ROWS rows run as `(W @ x.T).T`, where that
    measures faster on this CPU for `rows` rows; what was measured and decided, in one line."""
    linears = cpu_linears(model)
    if not linears or rows > SKINNY_ROWS:
        return "decoding products: torch's own"
    largest = max(linears, key=lambda m: m.weight.numel())
    faster, stock, transposed = transposed_product_is_faster(largest.weight.detach(), rows)
    figures = (f"{rows} x {largest.weight.shape[1]} by the {tuple(largest.weight.shape)} matrix: "
               f"x @ W.T {stock * 1e3:.1f} ms, (W @ x.T).T {transposed * 1e3:.1f} ms")
    if not faster:
        return f"decoding products: torch's own ({figures})"
    skinny_products(linears, True)
    return f"decoding products: (W @ x.T).T in {len(linears)} linear layers ({figures})"
