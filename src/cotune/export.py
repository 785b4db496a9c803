"""The export stage: merge the LoRA adapter into 16/32-bit base weights and hand them from memory to llama.cpp's own
converter, which writes each GGUF type of the quant table; the merged HF folder (its chat template renders the
training prompt) is saved meanwhile, and the k-quants are made through llama-cpp-python's quantizer."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

from . import quants
from .cpu import cpu_threads
from .errors import UserError, warn
from .files import atomic_path, run_relative, sha256_any, sha256_file, write_run_record
from .settings import Settings

MAX_SHARD_SIZE = "50GB"  # save_pretrained's default, given explicitly: the converter's tensor order follows the shards


def check_disk(settings: Settings, n_params: int, merge_bytes_per_weight: int) -> None:
    out = settings.stage_dir("export")
    out.mkdir(parents=True, exist_ok=True)
    plan = quants.plan(settings.gguf_quants)
    written = sorted(q.name for q in plan.convert + plan.quantize)
    need = n_params * (merge_bytes_per_weight + quants.bytes_per_weight_written(settings.gguf_quants)) * 1.05
    free = shutil.disk_usage(out).free
    if free < need:
        raise UserError(f"{out}: {free / 2**30:.2f} GiB free, the merge and conversion need about "
                        f"{need / 2**30:.2f} GiB ({n_params / 1e6:.0f}M weights, {', '.join(written)}); free "
                        "disk or point RUN_DIR elsewhere")


def merge_precision(settings: Settings, cuda: bool) -> tuple[str, bool]:
    """(dtype, NF4 base?) the adapter is merged in: those training used, as its record says (the backend's choice:
    DTYPE=fp16 trains and merges in fp16, a 4-bit run merges into the NF4 base it was trained against). Half
    precision and NF4 need a CUDA GPU here; without one the merge runs in fp32, with a WARNING."""
    record = settings.stage_dir("train") / "run.json"
    if record.is_file():
        summary = json.loads(record.read_text()).get("summary", {})
        dtype, nf4 = summary.get("dtype", "fp32"), bool(summary.get("load_in_4bit"))
    else:  # an adapter without its record (a run made before records held the precision): the same choice again
        from .backends import choose_backend

        backend = choose_backend(settings, quiet=True)
        dtype, nf4 = backend.dtype, backend.load_in_4bit
    if cuda:
        return dtype, nf4
    if nf4:
        warn("training loaded the base in 4-bit (NF4) on a GPU; without one here the adapter is merged into the "
             "original base weights in fp32, which differ slightly from the NF4 weights it was trained against")
    elif dtype != "fp32":
        warn(f"training ran in {dtype} on a GPU; without one here the merge runs in fp32")
    return "fp32", False


def merge_adapter(precision: tuple[str, bool], base: Path, adapter: Path, chat_template: str, rope: str = ""):
    """(model, tokenizer, what was merged into): the adapter merged into the weights in memory, in the precision
    training used (merge_precision). For a 4-bit run the base is loaded in NF4 exactly as trained and then
    dequantized, so the merged weights are the ones the adapter was trained against."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .models import load_tokenizer, model_config

    cuda = torch.cuda.is_available()
    config = model_config(base, rope)  # ROPE_SCALING: the merged model keeps the positions it was trained with
    extra = {"config": config} if config is not None else {}
    dtype_name, nf4 = precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if nf4:
        from .backends.hf import nf4_config

        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=nf4_config(dtype), dtype=dtype,
                                                     use_safetensors=True, device_map={"": 0}, **extra)
        model = model.dequantize()
        merged_into = "NF4 base weights dequantized to " + str(dtype).removeprefix("torch.")
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True,
                                                     device_map={"": 0} if cuda else None, **extra)
        merged_into = "original base weights in " + str(dtype).removeprefix("torch.")
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = load_tokenizer(base)
    tokenizer.chat_template = chat_template
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, {"merged_into": merged_into, "dtype": str(dtype).removeprefix("torch."),
                              "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id}


def save_merged(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(folder)


def tensors_as_saved(model) -> list[tuple[str, object]]:
    """The merged weights as `save_merged` writes them (tied copies left out the way save_pretrained leaves them
    out), in the order llama.cpp's converter reads them from that folder: shard files in name order, tensors in name
    order within a shard."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
    shards = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                max_shard_size=MAX_SHARD_SIZE).filename_to_tensors
    return [(name, state[name].contiguous()) for shard in sorted(shards) for name in sorted(shards[shard])]


def saved_tensor_order(folder: Path) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of a saved folder's weights in the order llama.cpp's converter reads them."""
    order = []
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        order += [(name, header[name]["dtype"], header[name]["shape"]) for name in sorted(header)]
    return order


def check_saved_as_fed(folder: Path, fed: list[tuple[str, object]]) -> None:
    """The GGUFs were made from the tensors in memory; the merged folder must hold the same ones in the same order,
    or the GGUF would differ from what the converter writes from that folder."""
    dtypes = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}
    expected = [(name, dtypes.get(str(t.dtype), str(t.dtype)), list(t.shape)) for name, t in fed]
    saved = saved_tensor_order(folder)
    if saved != expected:
        differ = next(i for i, (a, b) in enumerate(zip(saved + [None] * len(expected), expected + [None] * len(saved)))
                      if a != b)
        raise RuntimeError(f"{folder}: save_pretrained wrote other tensors than the converter was given (first "
                           f"difference at #{differ}: saved {saved[differ:differ + 1]}, given "
                           f"{expected[differ:differ + 1]}); the export can't vouch for its GGUFs")


@contextlib.contextmanager
def converter_folder(out: Path, model, tokenizer, name: str):
    """What llama.cpp's converter reads besides the weights (config, generation config, tokenizer), written by
    save_pretrained itself into a folder with the merged folder's name (the GGUF's general.name comes from it)."""
    folder = Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=out)) / name
    try:
        model.save_pretrained(folder, state_dict={}, max_shard_size=MAX_SHARD_SIZE)  # config files, no weights
        for empty in folder.glob("*.safetensors"):
            empty.unlink()
        tokenizer.save_pretrained(folder)
        yield folder
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


def require_tokenizer(folder: Path) -> None:
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise UserError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model); the GGUF needs one. Save the "
                        "tokenizer into the folder (tokenizer.save_pretrained) and export again")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: no config.json; not a model folder saved with save_pretrained")


def convert_to_gguf(merged: Path, outfile: Path, quant: str) -> None:
    """llama.cpp's converter as a subprocess, unmodified, reading a saved folder: the reference the in-memory export
    is checked against (tests, scripts/gpu_export_bench.sh)."""
    from .converter import converter_script

    require_tokenizer(merged)
    outtype = quants.QUANTS[quant].file_type.split("_", 1)[1].lower()  # MOSTLY_Q8_0 -> q8_0, ALL_F32 -> f32
    with atomic_path(outfile, suffix=".gguf") as tmp:
        proc = subprocess.run([sys.executable, str(converter_script()), str(merged), "--outfile", str(tmp),
                               "--outtype", outtype], capture_output=True, text=True)
        if proc.returncode != 0:
            if "No space left on device" in proc.stderr:
                raise OSError(errno.ENOSPC, "No space left on device", str(outfile))
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise UserError(f"llama.cpp's converter failed on {merged} ({quant}): {' | '.join(tail)}")


def convert_in_memory(folder: Path, tensors, outfile: Path, quant: str, threads: int) -> str:
    """The converter on the merged weights in memory (see converter.convert_from_memory); returns the sha256."""
    from .converter import convert_from_memory

    require_tokenizer(folder)
    return convert_from_memory(folder, tensors, outfile, quants.QUANTS[quant].file_type, threads)


def quantize_gguf(source: Path, outfile: Path, quant: str, threads: int = 0) -> None:
    """Quantize through llama-cpp-python's binding of llama_model_quantize (no llama-quantize binary)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quants.QUANTS[quant].llama_ftype()
    params.nthread = threads  # 0: all cores
    llama_log = logging.getLogger("llama-cpp-python")  # llama-cpp-python prints llama.cpp's log through it
    level = llama_log.level
    llama_log.setLevel(logging.CRITICAL + 1)  # a line per tensor otherwise
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(outfile).encode(), params)
    finally:
        llama_log.setLevel(level)
    if rc != 0:
        if shutil.disk_usage(outfile.parent).free < source.stat().st_size // 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(outfile))
        raise UserError(f"quantizing {source.name} to {quant} failed (llama_model_quantize returned {rc})")


def run_export_stage(settings: Settings) -> dict:
    started = time.monotonic()
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
    precision = merge_precision(settings, cuda)
    merge_bytes = 4 if precision[0] == "fp32" else 2
    preflight_memory(base, bytes_per_weight=merge_bytes, what="the merge", gpu=cuda)
    if settings.disk_check:
        check_disk(settings, n_params, merge_bytes_per_weight=merge_bytes)
    try:
        return _export(settings, out, base, adapter, template, n_params, started, precision)
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


class Background:
    """Work that runs beside the conversions (the merged folder's save, the k-quants, hashing the record's inputs);
    a failure surfaces when the stage waits for it."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="export")
        self.jobs: dict[str, Future] = {}

    def start(self, name: str, fn, *args) -> None:
        self.jobs[name] = self.pool.submit(fn, *args)

    def result(self, name: str):
        return self.jobs[name].result()

    def finish(self) -> None:
        """Wait for every job; raise a full disk before any other failure (the message the user can act on)."""
        wait(self.jobs.values())
        errors = [f.exception() for f in self.jobs.values() if f.exception() is not None]
        if errors:
            raise next((e for e in errors if is_disk_full(e)), errors[0])


def timed(seconds: dict, name: str, fn, *args):
    t0 = time.monotonic()
    result = fn(*args)
    seconds[name] = time.monotonic() - t0
    return result


def _export(settings: Settings, out: Path, base: Path, adapter: Path, template, n_params: int, started: float,
            precision: tuple[str, bool]) -> dict:
    import torch

    merged = out / "merged"
    plan = quants.plan(settings.gguf_quants)
    wanted = [q.name for q in plan.convert + plan.quantize if q.name not in plan.intermediate]
    threads = cpu_threads()
    seconds: dict[str, float] = {}  # each step, those in the background included; they overlap, see "total"
    hashes: dict[Path, str] = {}
    background = Background(workers=4)
    # the GGUFs are written here and renamed into place together once all are done: a kill leaves none as done
    staged = Path(tempfile.mkdtemp(prefix=".tmp-ggufs-", dir=out))
    try:
        background.start("adapter", sha256_any, adapter)
        background.start("base_model", timed, seconds, "sha256_base_model", sha256_any, base)
        model, tokenizer, merge = timed(seconds, "merge", merge_adapter, precision, base, adapter,
                                        template.chat_template(), settings.rope_scaling)
        if model.device.type != "cpu":
            # the converter and the safetensors writer both read host memory
            model = timed(seconds, "to_cpu", model.to, "cpu")
            torch.cuda.empty_cache()
        tensors = tensors_as_saved(model)
        with converter_folder(out, model, tokenizer, merged.name) as folder:
            background.start("merged", _save_and_hash_merged, model, tokenizer, merged, tensors, seconds)
            for quant in plan.convert:
                target = staged / quants.gguf_path(settings, quant.name).name
                # sha256 is taken while writing: no separate pass over the file
                hashes[target] = timed(seconds, f"convert_{quant.name}", convert_in_memory, folder, tensors, target,
                                       quant.name, threads)
                for made in (q for q in plan.quantize if q.quantized_from == quant.name):
                    background.start(made.name, _quantize_and_hash, target, staged / quants.gguf_path(settings, made.name).name,
                                     made.name, threads, seconds)
        del tensors, model
        timed(seconds, "wait_background", background.finish)
        hashes.update({staged / quants.gguf_path(settings, q.name).name: background.result(q.name) for q in plan.quantize})
        files = {q: quants.gguf_path(settings, q) for q in wanted}
        for quant, final in files.items():
            os.replace(staged / final.name, final)
            hashes[final] = hashes[staged / final.name]
    finally:
        background.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staged, ignore_errors=True)
    hashes.update({merged: background.result("merged"), adapter: background.result("adapter"),
                   base: background.result("base_model")})
    ggufs = {q: {"path": run_relative(p, settings.run_path), "bytes": p.stat().st_size, "sha256": hashes[p]}
             for q, p in files.items()}
    seconds["total"] = time.monotonic() - started
    return write_run_record(out, settings.public_dict(), {"adapter": adapter, "base_model": base},
                            {"merged": merged, **{f"gguf_{q}": p for q, p in files.items()}},
                            extra={"merge": merge, "ggufs": ggufs, "n_params": n_params, "threads": threads,
                                   "seconds": seconds, "chat_template": template.chat_template(),
                                   "prompt_for_probe": template.prompt(settings.probe_question)},
                            known_sha256=hashes)


def _save_and_hash_merged(model, tokenizer, merged: Path, fed, seconds: dict) -> str:
    with atomic_path(merged) as tmp:
        timed(seconds, "save_merged", save_merged, model, tokenizer, tmp)
        check_saved_as_fed(tmp, fed)
    return timed(seconds, "sha256_merged", sha256_any, merged)


def _quantize_and_hash(source: Path, target: Path, quant: str, threads: int, seconds: dict) -> str:
    timed(seconds, f"quantize_{quant}", quantize_gguf, source, target, quant, threads)
    return timed(seconds, f"sha256_{quant}", sha256_file, target)
