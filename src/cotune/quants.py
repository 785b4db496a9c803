"""The GGUF types cotune can write: one row each, read by the settings check, the export, its disk check and verify.

A new type is one row. Standard library only at import time (settings imports this); llama.cpp's numbers for a
type are looked up by name in `gguf.LlamaFileType` / `llama_cpp.LLAMA_FTYPE_*` when they are needed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The file types llama.cpp's converter writes itself (its --outtype choices f32, f16, bf16, q8_0).
CONVERTER_FILE_TYPES = ("ALL_F32", "MOSTLY_F16", "MOSTLY_BF16", "MOSTLY_Q8_0")


@dataclass(frozen=True)
class QuantType:
    name: str                  # in GGUF_QUANTS and in file names: model-<name>.gguf
    file_type: str             # llama.cpp's name for it: gguf.LlamaFileType.<file_type>, llama_cpp.LLAMA_FTYPE_<file_type>
    bytes_per_weight: float    # on disk, for the free-space check before the export writes anything
    quantized_from: str = ""   # '': written by llama.cpp's converter; else the type llama_model_quantize reads

    @property
    def by_converter(self) -> bool:
        return not self.quantized_from

    def llama_ftype(self) -> int:
        """llama.h's LLAMA_FTYPE_* value, for llama_model_quantize."""
        import llama_cpp

        return int(getattr(llama_cpp, f"LLAMA_FTYPE_{self.file_type}"))


QUANTS: dict[str, QuantType] = {q.name: q for q in (
    QuantType("Q8_0", "MOSTLY_Q8_0", 34 / 32),  # blocks of 32 weights: 32 int8 + an f16 scale
    QuantType("F16", "MOSTLY_F16", 2.0),  # the report's logit reference, and what the k-quants are made from
    QuantType("Q4_K_M", "MOSTLY_Q4_K_M", 0.61, quantized_from="F16"),
)}
REQUIRED = "Q8_0"  # the file verify checks and push publishes


def names() -> tuple[str, ...]:
    return tuple(QUANTS)


def check_choice(wanted: list[str]) -> str | None:
    """The settings check of GGUF_QUANTS: None when fine, else what is wrong."""
    if not wanted:
        return "must name at least one of " + ", ".join(QUANTS)
    bad = [q for q in wanted if q not in QUANTS]
    if bad:
        return f"unknown quant type {', '.join(bad)}; allowed: {', '.join(QUANTS)}"
    if REQUIRED not in wanted:
        return f"must include {REQUIRED} (the file verify checks)"
    return None


@dataclass(frozen=True)
class Plan:
    convert: tuple[QuantType, ...]   # written by the converter, sources of quantize first
    quantize: tuple[QuantType, ...]  # made from a converter output by llama_model_quantize
    intermediate: frozenset[str]     # sources written only to quantize from, deleted afterwards


def plan(wanted: list[str]) -> Plan:
    """What to write for GGUF_QUANTS, and in which order."""
    rows = [QUANTS[q] for q in dict.fromkeys(wanted)]
    quantize = tuple(q for q in rows if not q.by_converter)
    sources = list(dict.fromkeys(q.quantized_from for q in quantize))
    for source in sources:
        if source not in QUANTS or not QUANTS[source].by_converter:
            raise ValueError(f"quant type table: {source} (a quantize source) must be a row the converter writes")
    for q in rows + [QUANTS[s] for s in sources]:
        if q.by_converter and q.file_type not in CONVERTER_FILE_TYPES:
            raise ValueError(f"quant type table: llama.cpp's converter can't write {q.name} ({q.file_type}); give it "
                             "quantized_from=<a type the converter writes>")
    convert = tuple(QUANTS[s] for s in sources) + tuple(q for q in rows if q.by_converter and q.name not in sources)
    return Plan(convert, quantize, frozenset(s for s in sources if s not in wanted))


def bytes_per_weight_written(wanted: list[str]) -> float:
    """Every GGUF the export writes for GGUF_QUANTS, intermediates included, in bytes per weight."""
    p = plan(wanted)
    return sum(q.bytes_per_weight for q in p.convert + p.quantize)


def file_type_name(value: int) -> str:
    """A GGUF's general.file_type as a name: the table's own, else llama.cpp's (for a GGUF made elsewhere)."""
    import llama_cpp

    for q in QUANTS.values():
        if getattr(llama_cpp, f"LLAMA_FTYPE_{q.file_type}", None) == value:
            return q.name
    for attr in dir(llama_cpp):
        if attr.startswith("LLAMA_FTYPE_") and getattr(llama_cpp, attr) == value and attr != "LLAMA_FTYPE_GUESSED":
            return attr.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
    return str(value)


def gguf_path(settings, quant: str) -> Path:
    """Where the export writes the run's file of this type: <run>/export/<GGUF_NAME or base model>-cotune-<type>.gguf."""
    from .models import model_name_stem

    stem = settings.gguf_name or f"{model_name_stem(settings.base_model)}-cotune"
    return settings.stage_dir("export") / f"{stem}-{quant}.gguf"
