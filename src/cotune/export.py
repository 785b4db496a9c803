"""The export stage: merge the LoRA adapter into 16/32-bit base weights, save a plain HF folder whose chat template
renders the training prompt, convert it with llama.cpp's own converter, and quantize through llama-cpp-python."""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import UserError, warn
from .files import atomic_path, quiet_native_stderr, sha256_file, write_run_record
from .settings import Settings

# Bytes per weight of each GGUF type, for the disk preflight (Q8_0: 34 bytes per 32 weights).
GGUF_BYTES_PER_WEIGHT = {"F32": 4.0, "F16": 2.0, "Q8_0": 34 / 32, "Q4_K_M": 0.61}
CONVERTER_OUTTYPE = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0"}
LLAMA_FTYPE = {"Q4_K_M": 15}  # llama.h: LLAMA_FTYPE_MOSTLY_Q4_K_M


def gguf_stem(settings: Settings) -> str:
    from .models import model_name_stem

    return settings.gguf_name or f"{model_name_stem(settings.base_model)}-cotune"


def gguf_path(settings: Settings, quant: str) -> Path:
    return settings.stage_dir("export") / f"{gguf_stem(settings)}-{quant}.gguf"


def check_disk(settings: Settings, n_params: int, merge_bytes_per_weight: int) -> None:
    out = settings.stage_dir("export")
    out.mkdir(parents=True, exist_ok=True)
    quants = set(settings.gguf_quants)
    if "Q4_K_M" in quants:
        quants.add("F16")  # the quantizer's source
    need = n_params * (merge_bytes_per_weight + sum(GGUF_BYTES_PER_WEIGHT[q] for q in quants)) * 1.05
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"{out}: {free / 2**30:.2f} GiB free, the merge and conversion need about "
                        f"{need / 2**30:.2f} GiB ({n_params / 1e6:.0f}M weights, {', '.join(sorted(quants))}); free "
                        "disk or point RUN_DIR elsewhere")


def merge_adapter(settings: Settings, base: Path, adapter: Path, merged: Path, chat_template: str) -> dict:
    """Merge into full-precision weights. For a 4-bit run the base is loaded in NF4 exactly as trained and then
    dequantized, so the merged weights are the ones the adapter was trained against."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .models import load_tokenizer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else (torch.float16 if cuda else torch.float32)
    if settings.load_in_4bit and cuda:
        from .backends import nf4_config

        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=nf4_config(dtype), dtype=dtype,
                                                     use_safetensors=True, device_map={"": 0})
        model = model.dequantize()
        merged_into = "NF4 base weights dequantized to " + str(dtype).removeprefix("torch.")
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True,
                                                     device_map={"": 0} if cuda else None)
        merged_into = "original base weights in " + str(dtype).removeprefix("torch.")
        if settings.load_in_4bit and not cuda:
            warn("LOAD_IN_4BIT=true but no CUDA GPU: training ran in fp32, so the merge uses the fp32 base weights")
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = load_tokenizer(base)
    tokenizer.chat_template = chat_template
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_path(merged) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return {"merged_into": merged_into, "dtype": str(dtype).removeprefix("torch."),
            "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id}


def require_tokenizer(folder: Path) -> None:
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise UserError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model); the GGUF needs one. Save the "
                        "tokenizer into the folder (tokenizer.save_pretrained) and export again")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json; not a model folder saved with save_pretrained")


def convert_to_gguf(merged: Path, outfile: Path, quant: str) -> None:
    """llama.cpp's converter, as a subprocess: it puts its own gguf-py on sys.path."""
    from .converter import converter_script

    require_tokenizer(merged)
    with atomic_path(outfile, suffix=".gguf") as tmp:
        proc = subprocess.run([sys.executable, str(converter_script()), str(merged), "--outfile", str(tmp),
                               "--outtype", CONVERTER_OUTTYPE[quant]], capture_output=True, text=True)
        if proc.returncode != 0:
            if "No space left on device" in proc.stderr:
                raise OSError(errno.ENOSPC, "No space left on device", str(outfile))
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise UserError(f"llama.cpp's converter failed on {merged} ({quant}): {' | '.join(tail)}")


def quantize_gguf(source: Path, outfile: Path, quant: str) -> None:
    """Quantize through llama-cpp-python's binding of llama_model_quantize (no llama-quantize binary)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[quant]
    with atomic_path(outfile, suffix=".gguf") as tmp:
        with quiet_native_stderr():
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise UserError(f"quantizing {source.name} to {quant} failed (llama_model_quantize returned {rc})")


def run_export_stage(settings: Settings) -> dict:
    from .models import base_model_path, count_parameters, preflight_memory
    from .prompts import load_template

    out = settings.stage_dir("export")
    adapter = settings.stage_dir("train") / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: no trained adapter; run `make train` first")
    base = base_model_path(settings)
    template = load_template(settings.template)
    import torch

    n_params = count_parameters(base)
    cuda = torch.cuda.is_available()
    merge_bytes = 2 if cuda else 4  # merged in bf16/fp16 on a GPU, fp32 on a CPU, as merge_adapter does
    preflight_memory(base, bytes_per_weight=merge_bytes, what="the merge", gpu=cuda)
    if settings.disk_check:
        check_disk(settings, n_params, merge_bytes_per_weight=merge_bytes)
    try:
        return _export(settings, out, base, adapter, template, n_params)
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise UserError(f"{out}: the disk filled up while exporting (No space left on device); nothing half-written "
                        "was kept and earlier stages' outputs are intact. Free disk and run `make export` again") from None


def is_disk_full(err: BaseException) -> bool:
    """OSError from Python code, or the message of a library's own error type (safetensors raises a Rust error)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return "No space left on device" in str(err) or "os error 28" in str(err)


def _export(settings: Settings, out: Path, base: Path, adapter: Path, template, n_params: int) -> dict:
    merged = out / "merged"
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    merge = merge_adapter(settings, base, adapter, merged, template.chat_template())
    seconds["merge"] = time.monotonic() - t0

    files: dict[str, Path] = {}
    wanted = list(dict.fromkeys(settings.gguf_quants))
    intermediate = None
    if "Q4_K_M" in wanted and "F16" not in wanted:
        intermediate = out / f".{gguf_stem(settings)}-F16-for-quantize.gguf"
    for quant in ("F16", "Q8_0"):
        if quant in wanted or (quant == "F16" and intermediate):
            target = gguf_path(settings, quant) if quant in wanted else intermediate
            t0 = time.monotonic()
            convert_to_gguf(merged, target, quant)
            seconds[f"convert_{quant}"] = time.monotonic() - t0
            files[quant] = target
    if "Q4_K_M" in wanted:
        t0 = time.monotonic()
        quantize_gguf(files["F16"], gguf_path(settings, "Q4_K_M"), "Q4_K_M")
        seconds["quantize_Q4_K_M"] = time.monotonic() - t0
        files["Q4_K_M"] = gguf_path(settings, "Q4_K_M")
    if intermediate:
        intermediate.unlink(missing_ok=True)
        files.pop("F16")
    t0 = time.monotonic()
    ggufs = {q: {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256_file(p)} for q, p in files.items()}
    seconds["sha256"] = time.monotonic() - t0
    return write_run_record(out, settings.public_dict(), {"adapter": adapter, "base_model": base},
                            {"merged": merged, **{f"gguf_{q}": p for q, p in files.items()}},
                            extra={"merge": merge, "ggufs": ggufs, "n_params": n_params, "seconds": seconds,
                                   "chat_template": template.chat_template(),
                                   "prompt_for_probe": template.prompt(settings.probe_question)})
