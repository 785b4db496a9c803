"""The report stage: does the fine-tune work, and does the GGUF keep it. One self-contained HTML page and a Markdown
twin, every figure from this run's files, each saying how many samples it rests on."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .errors import UserError
from .files import atomic_path, write_json_atomic, write_text_atomic
from .hubrepo import commits_sentence
from .settings import Settings
from .verify import GREEDY


def _load(path: Path, target: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing; run `make {target}` first")
    return json.loads(path.read_text(encoding="utf-8"))


def gguf_answers(gguf: Path, prompts: list[tuple[str, str, str]], max_tokens: int, close_tag: str) -> list[dict]:
    """The GGUF answers each (kind, question, prompt), greedy, loaded as verify loads it."""
    from .verify import answer_greedy, context_needed, load_gguf

    n_ctx, _ = context_needed(gguf, [prompt for _, _, prompt in prompts], max_tokens)
    llm, _ = load_gguf(gguf, n_ctx=n_ctx)
    out = []
    try:
        for kind, question, prompt in prompts:
            reply = answer_greedy(llm, prompt, max_tokens)
            out.append({"kind": kind, "question": question, "answer": reply["text"],
                        "completion_tokens": reply["completion_tokens"],
                        "stopped_on_eos": reply["finish_reason"] == "stop",
                        "closed_reasoning": close_tag in reply["text"]})
    finally:
        llm.close()
    return out


def logit_fidelity(merged: Path, ggufs: dict[str, Path], texts: list[str]) -> dict:
    """Teacher-forced on the same token ids: top-1 agreement of each GGUF with the merged model, and |Δlogit|
    against the F16 GGUF (the converter's full-precision output)."""
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .files import quiet_native_stderr

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, use_safetensors=True).eval()
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    with torch.no_grad():
        hf = [model(torch.tensor([i])).logits[0].float().numpy() for i in ids]
    del model
    gguf_logits = {}
    for quant, path in ggufs.items():
        with quiet_native_stderr():
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(len(i) for i in ids) + 8, logits_all=True,
                                  verbose=False, n_gpu_layers=0)
        rows = []
        for i in ids:
            llm.reset()
            llm.eval(i)
            rows.append(np.array(llm.scores[: len(i)], dtype=np.float32))
        llm.close()
        gguf_logits[quant] = rows
    positions = sum(len(i) for i in ids)
    result = {"texts": len(texts), "positions": positions, "per_gguf": {}}
    for quant, rows in gguf_logits.items():
        vocab = min(rows[0].shape[1], hf[0].shape[1])
        agree = sum(int((h[:, :vocab].argmax(-1) == g[:, :vocab].argmax(-1)).sum()) for h, g in zip(hf, rows))
        entry = {"top1_agreement_with_merged": agree / positions}
        if "F16" in gguf_logits and quant != "F16":
            deltas = np.concatenate([np.abs(g[:, :vocab] - r[:, :vocab]).ravel()
                                     for g, r in zip(rows, gguf_logits["F16"])])
            entry.update({"mean_abs_dlogit_vs_F16": float(deltas.mean()), "max_abs_dlogit_vs_F16": float(deltas.max())})
        result["per_gguf"][quant] = entry
    return result


def adherence(answers: list[dict], limit: int) -> dict:
    held = [a for a in answers if a.get("kind", "probe") == "held_out"] or answers
    n = len(held)
    ok = sum(1 for a in held if a["closed_reasoning"] and a["stopped_on_eos"] and a["completion_tokens"] < limit)
    return {"n": n, "share_closed_and_stopped": ok / n if n else None,
            "mean_answer_tokens": sum(a["completion_tokens"] for a in held) / n if n else None}


def verified_ggufs(settings: Settings, export: dict, verify: dict) -> tuple[dict[str, Path], str]:
    """This run folder's GGUF files (looked up by name in its export/, so a moved or copied run folder reads its
    own), and the Q8_0's sha256, once verify's report is known to speak of that very file (by content)."""
    from .files import sha256_file

    out = settings.stage_dir("export")
    ggufs = {q: out / Path(info["path"]).name for q, info in export["ggufs"].items()}
    for quant, path in ggufs.items():
        if not path.is_file():
            raise UserError(f"{path}: listed by {out / 'run.json'} but missing; run `make export` again")
    q8_sha256 = sha256_file(ggufs["Q8_0"])
    if q8_sha256 != export["ggufs"]["Q8_0"]["sha256"]:
        raise UserError(f"{ggufs['Q8_0']}: not the file export wrote (its content changed since); remove "
                        f"{out / 'run.json'} and run `make export` again")
    if verify.get("sha256") != q8_sha256:
        raise UserError(f"{settings.stage_dir('verify') / 'report.json'}: speaks of {verify.get('gguf')}, not this "
                        f"run's {ggufs['Q8_0'].name}; run `make verify` again")
    return ggufs, q8_sha256


def collect(settings: Settings) -> dict:
    from .files import stage_fingerprint
    from .prompts import load_template

    run = settings.run_path
    data = _load(run / "data" / "run.json", "data")
    train = _load(run / "train" / "run.json", "train")
    base = _load(run / "baseline" / "answers.json", "baseline")
    after = _load(run / "after" / "answers.json", "after")
    export = _load(run / "export" / "run.json", "export")
    verify = _load(run / "verify" / "report.json", "verify")
    template = load_template(settings.template)
    ggufs, q8_sha256 = verified_ggufs(settings, export, verify)
    prompts = [(a["kind"], a["question"], a["prompt"]) for a in after["answers"]]
    gguf = gguf_answers(ggufs["Q8_0"], prompts, settings.max_new_tokens_after, template.reasoning_close)
    held_texts = [json.loads(line)["text"] for line in
                  (run / "data" / "eval.jsonl").read_text(encoding="utf-8").splitlines()[: max(2, settings.eval_questions)]]
    fidelity = logit_fidelity(run / "export" / "merged", ggufs, held_texts)
    s = train["summary"]
    return {
        "title": f"cotune report: {ggufs['Q8_0'].name}",
        "gguf": {"name": ggufs["Q8_0"].name, "sha256": q8_sha256},
        "settings": data["settings"] | train["settings"],
        "hub_commits": train.get("hub_commits", {}),
        "versions": train["versions"],
        "dataset": {"name": data["dataset"], "sha256": data["inputs"].get("dataset", {}).get("sha256"),
                    "train_rows": data["stats"]["train"]["rows"], "eval_rows": data["stats"]["eval"]["rows"]},
        "ggufs": export["ggufs"],
        "training": {k: s[k] for k in ("backend", "device", "dtype", "global_step", "first_loss", "last_loss",
                                        "eval_loss_start", "eval_loss_end", "perplexity_start", "perplexity_end")},
        "eval_rows_for_loss": data["stats"]["eval"]["rows"],
        "probe": [{"question": b["question"], "base": b["answer"], "fine_tuned": a["answer"], "gguf": g["answer"]}
                  for b, a, g in zip(base["answers"], after["answers"], gguf) if b.get("kind", "probe") == "probe"],
        "adherence": {
            "base": adherence(base["answers"], base["decoding"]["max_new_tokens"]),
            "fine_tuned": adherence(after["answers"], after["decoding"]["max_new_tokens"]),
            "gguf_Q8_0": adherence(gguf, settings.max_new_tokens_after),
        },
        "fidelity": fidelity,
        "verify_passed": verify["passed"],
        "verify_checks": verify["checks"],
        "decoding": {"greedy": True, **GREEDY},
        "stage_fingerprint": stage_fingerprint("report", settings.public_dict()),
    }


def _fmt(value, digits=3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def render_markdown(r: dict, image_name: str) -> str:
    t, f = r["training"], r["fidelity"]
    lines = [f"# {r['title']}", "", f"Verify: **{'PASSED' if r['verify_passed'] else 'FAILED'}**. "
             f"Dataset {r['dataset']['name']} (sha256 {_fmt(r['dataset']['sha256'])}), {r['dataset']['train_rows']} "
             f"training rows, {r['dataset']['eval_rows']} held out. Greedy decoding, seed {r['decoding']['seed']}.", "",
             *([commits_sentence(r["hub_commits"]), ""] if r.get("hub_commits") else []),
             f"![training and held-out loss]({image_name})", "",
             f"## Held-out loss ({r['eval_rows_for_loss']} rows)", "", "| | before | after |", "|---|---|---|",
             f"| loss | {_fmt(t['eval_loss_start'])} | {_fmt(t['eval_loss_end'])} |",
             f"| perplexity | {_fmt(t['perplexity_start'], 2)} | {_fmt(t['perplexity_end'], 2)} |", "",
             "## Probe question", ""]
    for p in r["probe"]:
        lines += [f"**{p['question']}**", "", "| base | fine-tuned | GGUF Q8_0 |", "|---|---|---|",
                  "| " + " | ".join(p[k].replace("\n", "<br>").replace("|", "\\|") for k in ("base", "fine_tuned", "gguf"))
                  + " |", ""]
    lines += ["## Format adherence on held-out questions", "",
              "| model | questions | closed reasoning and stopped on EOS | mean answer tokens |", "|---|---|---|---|"]
    for name, a in r["adherence"].items():
        lines.append(f"| {name} | {a['n']} | {_fmt(a['share_closed_and_stopped'], 2)} | {_fmt(a['mean_answer_tokens'], 1)} |")
    lines += ["", f"## GGUF fidelity ({f['texts']} held-out texts, {f['positions']} token positions, teacher-forced)", "",
              "| GGUF | top-1 agreement with merged model | mean abs(Δlogit) vs F16 | max abs(Δlogit) vs F16 |",
              "|---|---|---|---|"]
    for q, e in f["per_gguf"].items():
        lines.append(f"| {q} | {_fmt(e['top1_agreement_with_merged'], 4)} | {_fmt(e.get('mean_abs_dlogit_vs_F16'))} | "
                     f"{_fmt(e.get('max_abs_dlogit_vs_F16'))} |")
    lines += ["", "## GGUF files", "", "| type | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {q} | {i['bytes']} | {i['sha256']} |" for q, i in r["ggufs"].items()]
    lines += ["", "## Settings and versions", "", "```json", json.dumps({"settings": r["settings"],
                                                                       "versions": r["versions"]},
                                                                      ensure_ascii=False, indent=1), "```", ""]
    return "\n".join(lines)


def render_html(r: dict, png: bytes) -> str:
    """The Markdown's content as one self-contained page (inline CSS, the loss curve as a data URI)."""
    e = html.escape
    t, f = r["training"], r["fidelity"]

    def table(head, rows, row_class=""):
        cls = f' class="{row_class}"' if row_class else ""
        return ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" +
                "".join(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) + "</table>")

    pre = lambda text: f"<pre>{e(text)}</pre>"  # noqa: E731
    parts = [
        "<!doctype html><html lang='zh'><head><meta charset='utf-8'>",
        f"<title>{e(r['title'])}</title><style>body{{font:14px system-ui,sans-serif;max-width:1200px;margin:2em auto;"
        "padding:0 1em}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;"
        "vertical-align:top;text-align:left}pre{white-space:pre-wrap;margin:0;max-width:380px}"
        ".pass{color:#070}.fail{color:#b00}</style></head><body>",
        f"<h1>{e(r['title'])}</h1>",
        f"<p>Verify: <b class='{'pass' if r['verify_passed'] else 'fail'}'>"
        f"{'PASSED' if r['verify_passed'] else 'FAILED'}</b>. Dataset {e(r['dataset']['name'])} (sha256 "
        f"<code>{e(str(r['dataset']['sha256']))}</code>), {r['dataset']['train_rows']} training rows, "
        f"{r['dataset']['eval_rows']} held out. Greedy decoding, seed {r['decoding']['seed']}.</p>",
        f"<p>{commits_sentence(r['hub_commits'], lambda t: f'<code>{e(t)}</code>')}</p>" if r.get("hub_commits") else "",
        "<img id='loss-curve' alt='training and held-out loss' src='data:image/png;base64,"
        + base64.b64encode(png).decode() + "'>",
        f"<h2>Held-out loss ({r['eval_rows_for_loss']} rows)</h2>",
        table(["", "before", "after"], [["loss", _fmt(t["eval_loss_start"]), _fmt(t["eval_loss_end"])],
                                        ["perplexity", _fmt(t["perplexity_start"], 2), _fmt(t["perplexity_end"], 2)]]),
        "<h2>Probe question: base, fine-tuned and GGUF side by side</h2>",
        table(["question", "base", "fine-tuned", "GGUF Q8_0"],
              [[e(p["question"]), pre(p["base"]), pre(p["fine_tuned"]), pre(p["gguf"])] for p in r["probe"]],
              row_class="probe-row"),
        "<h2>Format adherence on held-out questions</h2>",
        table(["model", "questions", "closed reasoning and stopped on EOS", "mean answer tokens"],
              [[e(n), a["n"], _fmt(a["share_closed_and_stopped"], 2), _fmt(a["mean_answer_tokens"], 1)]
               for n, a in r["adherence"].items()]),
        f"<h2>GGUF fidelity ({f['texts']} held-out texts, {f['positions']} token positions, teacher-forced)</h2>",
        table(["GGUF", "top-1 agreement with merged model", "mean |Δlogit| vs F16", "max |Δlogit| vs F16"],
              [[q, _fmt(x["top1_agreement_with_merged"], 4), _fmt(x.get("mean_abs_dlogit_vs_F16")),
                _fmt(x.get("max_abs_dlogit_vs_F16"))] for q, x in f["per_gguf"].items()]),
        "<h2>Verify checks</h2>",
        table(["check", "result", "detail"], [[e(c["check"]), {True: "PASS", False: "FAIL", None: "SKIP"}[c["passed"]],
                                              e(c["detail"])] for c in r["verify_checks"]]),
        "<h2>GGUF files</h2>",
        table(["type", "bytes", "sha256"], [[q, i["bytes"], f"<code>{i['sha256']}</code>"] for q, i in r["ggufs"].items()]),
        "<h2>Settings and versions</h2>",
        pre(json.dumps({"settings": r["settings"], "versions": r["versions"]}, ensure_ascii=False, indent=1)),
        # Says, once the page has loaded, how many images decoded: a headless browser can read it from the DOM.
        "<script>addEventListener('load',()=>{document.body.dataset.imagesLoaded=[...document.images]"
        ".filter(i=>i.complete&&i.naturalWidth>0).length})</script>",
        "</body></html>",
    ]
    return "".join(parts)


def run_report_stage(settings: Settings) -> dict:
    report = collect(settings)
    out = settings.stage_dir("report")
    png = (settings.stage_dir("train") / "loss.png").read_bytes()
    with atomic_path(out / "loss.png") as tmp:
        tmp.write_bytes(png)
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render_markdown(report, "loss.png"))
    write_text_atomic(out / "report.html", render_html(report, png))
    return report
