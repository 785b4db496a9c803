"""The report stage: does the fine-tune work, and does the GGUF keep it. It gathers this run's records and what
evaluation.py measures into one context (report.json), and renders it as one self-contained HTML page and a
Markdown twin from templates/report.{html,md}.j2."""
from __future__ import annotations

import base64
import json
from pathlib import Path

from .errors import UserError
from .evaluation import adherence, gguf_answers, logit_fidelity, verify_reply
from .files import atomic_path, write_json_atomic, write_text_atomic
from .hubrepo import commits_sentence
from .settings import Settings
from .verify import GREEDY


def _load(path: Path, target: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing; run `make {target}` first")
    return json.loads(path.read_text(encoding="utf-8"))


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
    # verify asked the probe question of this very Q8_0 (verified_ggufs checked its sha256) with the same greedy
    # decoding: its answer is taken, not decoded a second time
    gguf = gguf_answers(ggufs["Q8_0"], prompts, settings.max_new_tokens_after, template.reasoning_close,
                        known=verify_reply(verify, settings.max_new_tokens_after))
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


def _markdown_cell(text) -> str:
    return str(text).replace("\n", "<br>").replace("|", "\\|")


def _environment():
    """Both formats from templates/report.{md,html}.j2 over one context; HTML escapes every value it is given."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), undefined=StrictUndefined,
                      autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(fmt=_fmt, cell=_markdown_cell,
                       outcome=lambda passed: {True: "PASS", False: "FAIL", None: "SKIP"}[passed])
    return env


def render(report: dict, fmt: str, png: bytes, image_name: str = "loss.png") -> str:
    """The report as Markdown (`fmt="md"`, the loss curve beside it as `image_name`) or as one self-contained HTML
    page (`fmt="html"`, the curve inline as a data URI)."""
    from markupsafe import Markup, escape

    if fmt == "html":
        commits = Markup(commits_sentence(report.get("hub_commits") or {}, lambda t: f"<code>{escape(t)}</code>"))
    else:
        commits = commits_sentence(report.get("hub_commits") or {})
    context = {"r": report, "commits": commits, "image_name": image_name,
               "png_base64": base64.b64encode(png).decode() if fmt == "html" else "",
               "settings_json": json.dumps({"settings": report["settings"], "versions": report["versions"]},
                                           ensure_ascii=False, indent=1)}
    return _environment().get_template(f"report.{fmt}.j2").render(context)


def run_report_stage(settings: Settings) -> dict:
    report = collect(settings)
    out = settings.stage_dir("report")
    png = (settings.stage_dir("train") / "loss.png").read_bytes()
    with atomic_path(out / "loss.png") as tmp:
        tmp.write_bytes(png)
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", render(report, "md", png, "loss.png"))
    write_text_atomic(out / "report.html", render(report, "html", png))
    return report
