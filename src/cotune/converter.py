"""llama.cpp's HF -> GGUF converter, taken from the llama-cpp-python source distribution of exactly the installed
version (never committed, never cloned or built at export time). `python -m cotune.converter fetch` is run by
setup; export only looks it up, and runs it in its own process with the merged weights handed over from memory."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import UserError, warn
from .files import atomic_path, cache_root, sha256_file

CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def llama_cpp_version() -> str:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        raise UserError("llama-cpp-python is not installed; run `make setup`") from None


def converter_dir(version: str | None = None) -> Path:
    # COTUNE_CONVERTER: a converter folder of its own (the image's, or one fetched for a host whose
    # llama-cpp-python is built apart)
    override = os.environ.get("COTUNE_CONVERTER")
    return Path(override) if override else cache_root() / f"llama.cpp-converter-{version or llama_cpp_version()}"


def converter_script() -> Path:
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"llama.cpp's converter is missing ({script}); run `make setup` (it fetches the converter "
                        f"of llama-cpp-python {llama_cpp_version()} once, with network)")
    return script


def fetch_converter(sdist: Path | None = None) -> Path:
    """Extract the converter of the installed llama-cpp-python version into the cache (idempotent)."""
    version = llama_cpp_version()
    target = converter_dir(version)
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            # pip keeps the download in its HTTP cache, so a second machine state costs no network
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "llama-cpp-python",
                            f"llama-cpp-python=={version}", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar, atomic_path(target) as out:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and any(m.name[len(prefix):].startswith(keep) for keep in CONVERTER_MEMBERS)]
            for member in members:
                member.name = member.name[len(prefix):]
            if hasattr(tarfile, "data_filter"):
                tar.extractall(out, members=members, filter="data")
            else:  # Python before 3.11.4 (Debian bookworm's 3.11.2) has no extraction filters: refuse what "data" would
                unsafe = [m.name for m in members if m.issym() or m.islnk() or m.isdev() or m.name.startswith("/")
                          or ".." in Path(m.name).parts]
                if unsafe:
                    raise UserError(f"{sdist}: unexpected links or paths in the converter's files: {unsafe[:3]}")
                tar.extractall(out, members=members)
    return target


def converter_gguf():
    """The converter's own gguf-py, imported into this process. The gguf on PyPI lacks what the converter needs
    (and may hold other constants), so a copy of it imported earlier is dropped first."""
    root = converter_script().parent
    gguf_py = str(root / "gguf-py")
    loaded = sys.modules.get("gguf")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(gguf_py):
        for name in [n for n in sys.modules if n == "gguf" or n.startswith("gguf.")]:
            del sys.modules[name]
    for path in (str(root), gguf_py):  # gguf-py ends up first
        if path not in sys.path:
            sys.path.insert(0, path)
    import gguf

    return gguf


def load_converter():
    """(gguf, conversion): the converter's gguf-py and its model classes, imported into this process."""
    gguf = converter_gguf()
    import conversion

    logging.getLogger("hf-to-gguf").setLevel(logging.ERROR)  # as quiet as the subprocess whose output was dropped
    return gguf, conversion


def convert_from_memory(folder: Path, tensors: list[tuple[str, Any]], outfile: Path, file_type: str,
                        threads: int) -> str:
    """llama.cpp's converter run on `folder` (config and tokenizer files) with the weights handed over from memory
    instead of read from safetensors files there, in the order it would read them. Same model class, tensor names,
    metadata and quantization code as `convert_hf_to_gguf.py FOLDER --outtype ...`; the tensors are quantized on
    `threads` threads while the file is written in order, and hashed as they are written. Returns the sha256."""
    import torch

    gguf, conversion = load_converter()
    hparams = conversion.ModelBase.load_hparams(folder, False)
    arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    try:
        model_class = conversion.get_model_class(arch)
    except NotImplementedError:
        raise UserError(f"{folder}: llama.cpp's converter does not support the architecture {arch}") from None

    def index_tensors(self, remote_hf_model_id=None):
        indexed = {}
        for name, tensor in tensors:
            item = self.filter_tensors((name, lambda t=tensor: conversion.LazyTorchTensor.from_eager(t)))
            if item:
                indexed[item[0]] = item[1]
        return indexed

    fed_from_memory = type(model_class.__name__, (model_class,),
                           {"model_arch": model_class.model_arch, "index_tensors": index_tensors})
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the parallelism is across tensors; a thread pool inside each would oversubscribe
    try:
        with torch.inference_mode():
            model = fed_from_memory(folder, gguf.LlamaFileType[file_type], outfile)
            threaded = ThreadedTensorWriter(gguf, model.gguf_writer, threads)
            model.gguf_writer.write_tensors_to_file = threaded.write_tensors_to_file
            model.write()
    finally:
        torch.set_num_threads(torch_threads)
    return threaded.digest.hexdigest() if threaded.hashed else sha256_file(outfile)


class ThreadedTensorWriter:
    """GGUFWriter.write_tensors_to_file, the same bytes: each tensor's lazy chain (cast, quantize) is computed on a
    pool of threads a few tensors ahead of the writer, and every byte is hashed as it is written."""

    def __init__(self, gguf, writer, threads: int):
        self.gguf, self.writer, self.threads = gguf, writer, threads
        self.digest = hashlib.sha256()
        self.hashed = False

    def write_tensors_to_file(self, progress: bool = False) -> None:
        import numpy as np

        gguf, writer = self.gguf, self.writer
        infos = [ti for shard in writer.tensors for ti in shard.values()]
        if len(writer.fout or ()) != 1 or writer.temp_file is not None or \
                not all(isinstance(ti.tensor, (np.ndarray, gguf.LazyNumpyTensor)) for ti in infos):
            warn("this model's GGUF can't be written by the threaded writer (split file, temporary file or chunked "
                 "tensors); llama.cpp's converter writes it on one thread")
            type(writer).write_tensors_to_file(writer, progress=progress)
            return
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        fout.flush()
        with open(fout.name, "rb") as written:  # header, metadata and tensor table, as the writer wrote them
            self.digest.update(written.read())

        def compute(ti):
            data = ti.tensor
            if isinstance(data, gguf.LazyNumpyTensor):
                data = gguf.LazyNumpyTensor.to_eager(data)
            return np.ascontiguousarray(data).reshape(-1).view(np.uint8)

        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="gguf-tensor") as pool:
            ahead: deque = deque()
            queue = iter(infos)

            def top_up():
                while len(ahead) < 2 * self.threads and (ti := next(queue, None)) is not None:
                    ahead.append((ti, pool.submit(compute, ti)))

            top_up()
            try:
                while ahead:
                    ti, future = ahead.popleft()
                    data = future.result()
                    top_up()
                    if data.nbytes != ti.nbytes:
                        raise ValueError(f"a tensor computed to {data.nbytes} bytes; its table entry says {ti.nbytes}")
                    padding = bytes(writer.ggml_pad(ti.nbytes, writer.data_alignment) - ti.nbytes)
                    for chunk in (data, padding):
                        fout.write(chunk)
                        self.digest.update(chunk)
                    ti.tensor = None
                    del data
            finally:
                for _, future in ahead:
                    future.cancel()
        writer.state = type(writer.state).WEIGHTS
        self.hashed = True


def gguf_differences(a: Path, b: Path, limit: int = 10) -> list[str]:
    """How two GGUF files differ, metadata key by key and tensor by tensor (name, order, type, shape, bytes);
    [] when they hold the same. At most `limit` differences are listed."""
    import numpy as np

    gguf = converter_gguf()
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    found: list[str] = []

    def raw(field) -> bytes:
        return b"".join(bytes(part) for part in field.parts)

    for key in sorted(set(ra.fields) | set(rb.fields)):
        fa, fb = ra.fields.get(key), rb.fields.get(key)
        if fa is None or fb is None or raw(fa) != raw(fb):
            found.append(f"metadata {key}: {'absent' if fa is None else 'differs'} in {a.name}"
                         + (f", absent in {b.name}" if fb is None else ""))
    names_a, names_b = [t.name for t in ra.tensors], [t.name for t in rb.tensors]
    if names_a != names_b:
        found.append(f"tensor names or order differ: {len(names_a)} vs {len(names_b)} tensors, first difference "
                     f"{next(((x, y) for x, y in zip(names_a, names_b) if x != y), 'in length')}")
    for ta, tb in zip(ra.tensors, rb.tensors):
        if len(found) >= limit:
            break
        shape_a, shape_b = [int(n) for n in ta.shape], [int(n) for n in tb.shape]
        if (ta.tensor_type, shape_a) != (tb.tensor_type, shape_b):
            found.append(f"tensor {ta.name}: {ta.tensor_type.name} {shape_a} vs {tb.tensor_type.name} {shape_b}")
        elif not np.array_equal(np.ascontiguousarray(ta.data).reshape(-1).view(np.uint8),
                                np.ascontiguousarray(tb.data).reshape(-1).view(np.uint8)):
            found.append(f"tensor {ta.name}: same type and shape, different bytes")
    return found[:limit]


def main() -> None:
    if sys.argv[1:2] != ["fetch"] or len(sys.argv) > 3:
        sys.exit("usage: python -m cotune.converter fetch [SDIST]  (SDIST: llama-cpp-python's .tar.gz, else pip "
                 "downloads it)")
    sdist = Path(sys.argv[2]) if len(sys.argv) == 3 else None
    print(f"llama.cpp converter: {fetch_converter(sdist)}")


if __name__ == "__main__":
    main()
