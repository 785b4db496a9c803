"""BATCH_FIT=auto: the micro-batch, gradient accumulation and number of layers that recompute their activations that
run fastest on the GPU at hand, at the settings' sequences per optimizer step (BATCH_SIZE x GRAD_ACCUM, so the same
sequences make each step and the loss curve stays the same).

The choice comes from a memory model measured on this card before training, never from catching an out-of-memory
error mid-run: one forward and backward pass of one sequence with no layer recomputing its activations, and one with
every layer recomputing, give the activation bytes per token of each; the fixed part is what the loaded model, its
adapters' gradients and optimizer states take. The longest micro-batch the run can meet is priced from the training
rows themselves: the `micro` longest rows together (padding-free stacks) or `micro` times the longest row (stacks that
pad each micro-batch to its longest row).

The rule, from the measured speeds (docs/benchmarks.md): fewer, larger micro-batches first (on one H200, 2 x 4 -> 8 x 1
at the same 8 sequences per step was 2x the tokens/s), then, at that size, the fewest layers recomputed (recomputing
every layer costs about a third of a step). The micro-batch is sized for the longest one the data can make; how many
layers recompute is decided again before each micro-batch from its own tokens, so that the many short ones recompute
nothing and only the few long ones pay for it."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace

from .errors import UserError, warn

GiB = 2**30
HEADROOM = 0.92  # share of the budget a plan may fill: allocator fragmentation and kernels' scratch space
PROBE_TOKENS = 1024  # the probe sequence's length (or the longest row, if shorter): activations grow linearly


@dataclass(frozen=True)
class MemoryModel:
    fixed_bytes: float            # weights, adapters, their gradients and optimizer states
    full_bytes_per_token: float   # activations kept per token when no layer recomputes
    ckpt_bytes_per_token: float   # ... when every layer recomputes (Unsloth's kind keeps them in host RAM)
    layers: int

    def peak(self, tokens: int, recomputed: int) -> float:
        share = (self.layers - recomputed) / self.layers if self.layers else 0.0
        per_token = self.ckpt_bytes_per_token + share * max(0.0, self.full_bytes_per_token - self.ckpt_bytes_per_token)
        return self.fixed_bytes + tokens * per_token

    def fewest_recomputed(self, tokens: int, limit_bytes: float) -> int:
        """The fewest layers that must recompute for `tokens` in one micro-batch to fit `limit_bytes` (every layer
        where even that does not fit)."""
        return next((r for r in range(self.layers + 1) if self.peak(tokens, r) <= limit_bytes), self.layers)

    def tokens_without_recompute(self, limit_bytes: float) -> int:
        """The most tokens a micro-batch may hold with no layer recomputing."""
        return max(0, int((limit_bytes - self.fixed_bytes) // self.full_bytes_per_token)) \
            if self.full_bytes_per_token > 0 else 0


@dataclass(frozen=True)
class Fit:
    micro_batch: int
    grad_accum: int
    recomputed_layers: int
    layers: int
    micro_batch_tokens: int
    predicted_peak_gib: float
    budget_gib: float
    tokens_without_recompute: int = 0  # a micro-batch up to this many tokens recomputes no layer

    def describe(self) -> str:
        longest = (f"the longest micro-batch this data can make: {self.micro_batch_tokens:,} tokens; predicted peak "
                   f"{self.predicted_peak_gib:.1f} GiB of a {self.budget_gib:.1f} GiB budget")
        if not self.recomputed_layers:
            return f"{self.micro_batch} x {self.grad_accum}, no layer recomputes its activations ({longest})"
        return (f"{self.micro_batch} x {self.grad_accum}; layers recomputing their activations, per micro-batch by "
                f"its tokens: none up to {self.tokens_without_recompute:,} tokens, at most {self.recomputed_layers} "
                f"of {self.layers} ({longest})")

    def record(self) -> dict:
        return asdict(self)


def micro_batch_tokens(lengths: list[int], micro: int, padding_free: bool) -> int:
    """The most tokens one micro-batch of `micro` rows can hold: the `micro` longest rows together, or, where a
    micro-batch is padded to its longest row, `micro` times the longest."""
    top = sorted(lengths, reverse=True)[:micro]
    return sum(top) if padding_free else micro * (top[0] if top else 0)


def choose(model: MemoryModel, budget_bytes: float, sequences: int, lengths: list[int], *, padding_free: bool,
           may_recompute: bool, what: str = "this GPU") -> Fit:
    """The plan for `sequences` per optimizer step: the largest micro-batch dividing it that fits `budget_bytes`
    (times HEADROOM) with the fewest layers recomputed; layers recompute only where `may_recompute`."""
    limit = budget_bytes * HEADROOM
    for micro in [m for m in range(sequences, 0, -1) if sequences % m == 0]:
        tokens = micro_batch_tokens(lengths, micro, padding_free)
        recomputed = model.fewest_recomputed(tokens, limit) if may_recompute else 0
        peak = model.peak(tokens, recomputed)
        if peak <= limit:
            return Fit(micro, sequences // micro, recomputed, model.layers, tokens, peak / GiB, budget_bytes / GiB,
                       min(tokens, model.tokens_without_recompute(limit)))
    longest = max(lengths) if lengths else 0
    least = model.peak(longest, model.layers if may_recompute else 0)
    raise UserError(f"BATCH_FIT=auto: one sequence of the longest training row ({longest:,} tokens) needs about "
                    f"{least / GiB:.1f} GiB{' with every layer recomputing' if may_recompute else ''}, more than the "
                    f"{limit / GiB:.1f} GiB {what} leaves; lower MAX_SEQ_LENGTH, "
                    f"{'set GRADIENT_CHECKPOINTING=unsloth or true, ' if not may_recompute else ''}"
                    "raise GPU_MEMORY_LIMIT_GIB or train on a larger card")


# ------------------------------------------------------------------------------------------------------ on a GPU
def apply_memory_limit(settings, device_index: int = 0) -> float:
    """GPU_MEMORY_LIMIT_GIB as this process's cap on the card (PyTorch's allocator refuses beyond it); the bytes this
    process may use."""
    import torch

    total = torch.cuda.get_device_properties(device_index).total_memory
    if settings.gpu_memory_limit_gib:
        cap = settings.gpu_memory_limit_gib * GiB
        if cap > total:
            raise UserError(f"GPU_MEMORY_LIMIT_GIB={settings.gpu_memory_limit_gib:g} is more than this GPU's "
                            f"{total / GiB:.1f} GiB; lower it, or 0 for the whole card")
        torch.cuda.set_per_process_memory_fraction(cap / total, device_index)
        return cap
    return total


def checkpointing_layers(model) -> list:
    """The decoder layers that can each recompute their activations on their own (transformers'
    GradientCheckpointingLayer: Unsloth's and the plain stack's Qwen3 and Llama layers are)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def arm(model, layers: list) -> None:
    """Give the layers their checkpoint function where the stack switches checkpointing on only inside train()."""
    if layers and not hasattr(layers[0], "_gradient_checkpointing_func"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_recomputed(layers: list, recomputed: int) -> None:
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < recomputed


def measure(model, layers: list, probe_tokens: int, device_index: int, vocab: int, optimizer_bytes: float,
            may_recompute: bool = True) -> MemoryModel:
    """The memory model of this model on this card: one sequence of `probe_tokens` through a forward and backward
    pass with no layer recomputing, then (where layers may recompute) with every layer recomputing; the adapters'
    gradients are dropped after."""
    import torch

    device = torch.device("cuda", device_index)
    ids = torch.randint(3, max(4, vocab - 1), (1, probe_tokens), device=device)
    was_training = model.training
    model.train()

    def activation_bytes(recomputed: int) -> float:
        set_recomputed(layers, recomputed)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        model.zero_grad(set_to_none=True)
        return peak

    every = len(layers) if may_recompute else 0
    activation_bytes(every)  # warm-up: kernels compile and workspaces settle before anything is measured
    ckpt = activation_bytes(every)
    full = activation_bytes(0) if may_recompute else ckpt
    set_recomputed(layers, every)
    model.train(was_training)
    torch.cuda.empty_cache()
    return MemoryModel(torch.cuda.memory_allocated(device) + optimizer_bytes, full / probe_tokens,
                       ckpt / probe_tokens, len(layers))


def memory_budget(settings, backend, device_index: int = 0, warn_=None) -> float | None:
    """Apply GPU_MEMORY_LIMIT_GIB (before the model loads, so that loading keeps to it too); the bytes this process
    may use on its GPU, None on the CPU."""
    if backend.device != "cuda":
        if settings.gpu_memory_limit_gib:
            (warn_ or warn)(f"GPU_MEMORY_LIMIT_GIB={settings.gpu_memory_limit_gib:g} ignored: no CUDA GPU")
        return None
    return apply_memory_limit(settings, device_index)


def fit_batch(settings, backend, model, lengths: list[int], budget_bytes: float | None, *, world_size: int = 1,
              device_index: int = 0, say=print, warn_=None):
    """(settings with the fitted BATCH_SIZE and GRAD_ACCUM, the fit's record or None, why none): BATCH_FIT=auto on
    one CUDA process, the model loaded as trained; elsewhere the settings as they are, with a WARNING saying why.
    `lengths`: the training rows' tokens."""
    warn_ = warn_ or warn
    if settings.batch_fit != "auto":
        return settings, None, "BATCH_FIT=off"
    keep = f"keeping BATCH_SIZE={settings.batch_size} x GRAD_ACCUM={settings.grad_accum}"
    if backend.device != "cuda":
        why = f"BATCH_FIT=auto fits the batch to a GPU's memory; on the CPU it does nothing, {keep}"
        warn_(why)
        return settings, None, why
    if world_size > 1:
        why = f"BATCH_FIT=auto fits one process's batch; on {world_size} processes it does nothing, {keep}"
        warn_(why)
        return settings, None, why
    import torch

    layers = checkpointing_layers(model)
    may_recompute = backend.stack.checkpointing(settings.gradient_checkpointing) is not False
    if not layers:
        why = f"BATCH_FIT=auto: this model's layers can't recompute one by one, {keep}"
        warn_(why)
        return settings, None, why
    if may_recompute:
        arm(model, layers)
    budget = min(budget_bytes, torch.cuda.mem_get_info(device_index)[0] + torch.cuda.memory_reserved(device_index))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vocab = model.get_input_embeddings().weight.shape[0]
    memory = measure(model, layers, min(PROBE_TOKENS, max(lengths)), device_index, vocab,
                     optimizer_bytes=trainable * 12.0,  # fp32 gradient + two optimizer moments, at most
                     may_recompute=may_recompute)
    fit = choose(memory, budget, settings.batch_size * settings.grad_accum, lengths,
                 padding_free=backend.stack.padding_free, may_recompute=may_recompute)
    set_recomputed(layers, fit.recomputed_layers)
    say(f"batch fit: {fit.describe()}; measured {memory.full_bytes_per_token / 2**20:.3f} MiB of activations per "
        f"token with no layer recomputing, {memory.ckpt_bytes_per_token / 2**20:.3f} MiB with all, "
        f"{memory.fixed_bytes / GiB:.1f} GiB fixed")
    fitted = replace(settings, batch_size=fit.micro_batch, grad_accum=fit.grad_accum)
    return fitted, {**fit.record(), "memory_model": asdict(memory)}, None


def keep_recomputed(model, fit: dict | None) -> list:
    """The trainer callbacks a fit needs (none without one). Trainers and Unsloth switch checkpointing on for every
    layer when training starts; at every step the callback sets the fitted count for the longest micro-batch, and a
    hook before each training forward pass lowers it to what that micro-batch's own tokens need. At the end of
    training the fit's record gains how many micro-batches recomputed how many layers (from the step this run
    started at: a resumed run counts its own part)."""
    if fit is None:
        return []
    from transformers import TrainerCallback

    layers, worst = checkpointing_layers(model), fit["recomputed_layers"]
    memory = MemoryModel(**fit["memory_model"])
    limit = fit["budget_gib"] * GiB * HEADROOM
    seen: Counter = Counter()

    def before_forward(module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = ids.numel() if ids is not None else embeds.shape[0] * embeds.shape[1] if embeds is not None else None
        if tokens is None:
            return  # nothing to count: the step's setting (the longest micro-batch's) stays
        recomputed = min(worst, memory.fewest_recomputed(tokens, limit))
        set_recomputed(layers, recomputed)
        seen[recomputed] += 1

    class Keep(TrainerCallback):
        hook = None
        first_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.first_step = state.global_step
            if self.hook is None:
                self.hook = model.register_forward_pre_hook(before_forward, with_kwargs=True)

        def on_step_begin(self, args, state, control, **kwargs):
            set_recomputed(layers, worst)

        def on_train_end(self, args, state, control, **kwargs):
            if self.hook is not None:
                self.hook.remove()
                self.hook = None
            if state.global_step > self.first_step and not seen:
                warn(f"BATCH_FIT=auto: no training forward pass was seen, so every micro-batch recomputed {worst} of "
                     f"{len(layers)} layers (the longest micro-batch's count)")
            fit["micro_batches_by_recomputed_layers"] = {str(k): v for k, v in sorted(seen.items())}
            fit["counted_from_step"] = self.first_step

    return [Keep()]
