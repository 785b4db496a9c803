"""What the report measures, apart from how it shows it: the GGUF's own answers, its teacher-forced fidelity to the
merged model, and how often answers keep the trained format. Every figure says how many samples it rests on."""
from __future__ import annotations

from pathlib import Path

from .verify import answer_greedy, context_needed, load_gguf

FP32_BYTES = 4  # the merged model is loaded in fp32 on the CPU: the reference the GGUFs are compared against


def gguf_answers(gguf: Path, prompts: list[tuple[str, str, str]], max_tokens: int, close_tag: str,
                 known: dict[str, dict] | None = None) -> list[dict]:
    """The GGUF answers each (kind, question, prompt), greedy, loaded as verify loads it. `known`: replies this very
    file already gave with the same greedy decoding and token budget (verify's, by prompt; answer_greedy's keys),
    taken as they are instead of asked again."""
    replies = dict(known or {})
    todo = [prompt for _, _, prompt in prompts if prompt not in replies]
    if todo:
        n_ctx, _ = context_needed(gguf, todo, max_tokens)
        llm, _ = load_gguf(gguf, n_ctx=n_ctx)
        try:
            for prompt in todo:
                replies[prompt] = {**answer_greedy(llm, prompt, max_tokens), "source": "report"}
        finally:
            llm.close()
    out = []
    for kind, question, prompt in prompts:
        reply = replies[prompt]
        out.append({"kind": kind, "question": question, "answer": reply["text"],
                    "completion_tokens": reply["completion_tokens"],
                    "stopped_on_eos": reply["finish_reason"] == "stop",
                    "closed_reasoning": close_tag in reply["text"], "source": reply.get("source", "report")})
    return out


def verify_reply(verify: dict, max_tokens: int) -> dict[str, dict]:
    """Verify's answer to its prompt, by prompt, where it was asked exactly as the report would ask it (greedy, the
    same budget): the report takes it instead of decoding it again (the caller has checked it is this file's)."""
    from .verify import GREEDY

    decoding = verify.get("decoding") or {}
    if not verify.get("prompt") or decoding != {**GREEDY, "max_tokens": max_tokens} or "answer" not in verify:
        return {}
    return {verify["prompt"]: {"text": verify["answer"], "finish_reason": verify["finish_reason"],
                               "completion_tokens": verify["completion_tokens"], "source": "verify"}}


def common_opening(ids: list[list[int]]) -> int:
    """How many leading tokens every text shares, short of each text's last token."""
    opening = min(len(i) for i in ids) - 1
    for other in ids[1:]:
        k = 0
        while k < opening and other[k] == ids[0][k]:
            k += 1
        opening = k
    return max(opening, 0)


def fidelity_opening(merged: Path, ids: list[list[int]]) -> int:
    """The tokens the texts share, run once in the fidelity check where every layer of the model (and so of the GGUF
    converted from it) attends to every earlier position; 0 otherwise: a sliding window or a recurrent layer keeps
    other state than the cache up to a position."""
    from transformers import AutoConfig

    from .models import full_attention_only

    return common_opening(ids) if full_attention_only(AutoConfig.from_pretrained(merged)) else 0


def merged_logits(merged: Path, ids: list[list[int]], opening: int = 0) -> list:
    """The merged model's logits at every position of each text, in fp32 on the CPU, after checking it fits. The
    first `opening` tokens, which every text shares (`fidelity_opening`), run once: their logits are every text's
    first rows, their keys and values where each text goes on from."""
    import copy

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from .models import preflight_memory

    preflight_memory(merged, FP32_BYTES, "the report's fidelity check (the merged model in fp32)",
                     remedy="run `make report` on a machine with more RAM, where the run folder's export is")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, use_safetensors=True).eval()
    logits = []
    with torch.no_grad():
        kept = DynamicCache()
        first = model(torch.tensor([ids[0][:opening]]), past_key_values=kept, use_cache=True).logits[0].float().numpy() \
            if opening else None
        for i in ids:
            rest = model(torch.tensor([i[opening:]]), past_key_values=copy.deepcopy(kept),
                         use_cache=True).logits[0].float().numpy()
            logits.append(rest if first is None else np.concatenate([first, rest]))
    del model
    return logits


def gguf_logits(gguf: Path, ids: list[list[int]], opening: int = 0) -> list:
    """A GGUF's logits at every position of each text, on the CPU, loaded through verify's loader. The first
    `opening` tokens, which every text shares, are evaluated once: each text goes on from their end (`Llama.eval`
    drops the cache beyond `n_tokens`)."""
    import numpy as np

    llm, _ = load_gguf(gguf, n_ctx=max(len(i) for i in ids) + 8, gpu=False, logits_all=True)
    rows = []
    try:
        llm.reset()
        if opening:
            llm.eval(ids[0][:opening])
        for i in ids:
            llm.n_tokens = opening
            llm.eval(i[opening:])
            rows.append(np.array(llm.scores[: len(i)], dtype=np.float32))
    finally:
        llm.close()
    return rows


def logit_fidelity(merged: Path, ggufs: dict[str, Path], texts: list[str]) -> dict:
    """Teacher-forced on the same token ids: top-1 agreement of each GGUF with the merged model, and |Δlogit|
    against the F16 GGUF (the converter's full-precision output)."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    opening = fidelity_opening(merged, ids)
    hf = merged_logits(merged, ids, opening)
    per_gguf = {quant: gguf_logits(path, ids, opening) for quant, path in ggufs.items()}
    positions = sum(len(i) for i in ids)
    result = {"texts": len(texts), "positions": positions, "per_gguf": {}}
    for quant, rows in per_gguf.items():
        vocab = min(rows[0].shape[1], hf[0].shape[1])
        agree = sum(int((h[:, :vocab].argmax(-1) == g[:, :vocab].argmax(-1)).sum()) for h, g in zip(hf, rows))
        entry = {"top1_agreement_with_merged": agree / positions}
        if "F16" in per_gguf and quant != "F16":
            deltas = np.concatenate([np.abs(g[:, :vocab] - r[:, :vocab]).ravel()
                                     for g, r in zip(rows, per_gguf["F16"])])
            entry.update({"mean_abs_dlogit_vs_F16": float(deltas.mean()), "max_abs_dlogit_vs_F16": float(deltas.max())})
        result["per_gguf"][quant] = entry
    return result


def adherence(answers: list[dict], limit: int) -> dict:
    """On the held-out questions: the share of answers that closed their reasoning and stopped on EOS within the
    token limit, and their mean length."""
    held = [a for a in answers if a.get("kind", "probe") == "held_out"] or answers
    n = len(held)
    ok = sum(1 for a in held if a["closed_reasoning"] and a["stopped_on_eos"] and a["completion_tokens"] < limit)
    return {"n": n, "share_closed_and_stopped": ok / n if n else None,
            "mean_answer_tokens": sum(a["completion_tokens"] for a in held) / n if n else None}
