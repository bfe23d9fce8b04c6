"""GGUF files of the merged model, for llama.cpp and Ollama, made with llama.cpp's own tools.

The converter is llama.cpp's convert_hf_to_gguf.py, with its `conversion` package and gguf-py,
as llama-cpp-python 0.3.36 vendors them: its source archive on PyPI, checked against its sha256,
is unpacked once into the cache folder (model-cache/llama.cpp) and kept. It writes f16 and q8_0
itself; a 4-bit file is quantised from the f16 one by llama.cpp's quantiser (llama_model_quantize,
what llama.cpp's llama-quantize runs), through llama-cpp-python. No conversion code of ours: when
llama.cpp renames things, the pin moves and the converter with it.

    convert(merged, Path("models/exports/gguf-q8_0/model-q8_0.gguf"), "q8_0", Path("model-cache/llama.cpp"))
    answers(gguf_file, conversations, max_new_tokens=16, threads=0)  # the held-out check
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tuner.export import ExportError
from tuner.files import replace_folder
from tuner.serving.llamacpp import CHAT_TEMPLATE, GgufTokenizer, greedy, llama_cpp, open_gguf
from tuner.settings import GGUF_TYPES

LLAMA_CPP_PYTHON = "0.3.36"  # setup/requirements-gguf.txt pins the same version
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDORED = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
# The converter and what it reads: its model classes, gguf-py (the GGUF writer it was written
# with), the chat templates it gives some models, and the licence (MIT) that comes with them.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/", "LICENSE")
CONVERTER = "convert_hf_to_gguf.py"
# Types the converter writes itself (its --outtype), and those quantised from its f16 file.
CONVERTER_TYPES = {"f16": "f16", "q8_0": "q8_0"}
QUANTISER_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # llama_cpp's constant for each
EOS = "tokenizer.ggml.eos_token_id"
REQUIREMENTS = "pip install -r setup/requirements-gguf.txt"


def converter(cache: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, fetched into `cache` the first time. A fetch that is
    killed leaves a hidden temporary folder (removed next time), never a converter half there."""
    folder = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    script = folder / CONVERTER
    if script.is_file():
        return script
    cache.mkdir(parents=True, exist_ok=True)
    for leftover in cache.glob(".fetch-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    print(
        f"Fetching llama.cpp's converter from PyPI (llama-cpp-python=={LLAMA_CPP_PYTHON}, source archive)", flush=True
    )
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--dest", tmp]
        done = subprocess.run([*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], capture_output=True, text=True)
        archive = Path(tmp) / SDIST
        if done.returncode != 0 or not archive.is_file():
            said = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ExportError(f"cannot download llama-cpp-python=={LLAMA_CPP_PYTHON} from PyPI ({said})")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise ExportError(f"{SDIST} has sha256 {digest}, expected {SDIST_SHA256}: not the known file")
        new = Path(tmp) / "converter"
        with tarfile.open(archive) as tar:
            members = []
            for member in tar.getmembers():
                name = member.name.removeprefix(VENDORED)
                if name != member.name and name.startswith(CONVERTER_PARTS) and (member.isfile() or member.isdir()):
                    member.name = name
                    members.append(member)
            # The archive is the known one (sha256); the filter, where Python has it, refuses links out.
            tar.extractall(new, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        if not (new / CONVERTER).is_file():
            raise ExportError(f"{SDIST} has no {VENDORED}{CONVERTER}: not the known file")
        replace_folder(new, folder)
    return script


def convert(merged: Path, out: Path, quantize: str, cache: Path) -> None:
    """Write the GGUF file `out` of the merged model folder `merged`, of type `quantize` (one of
    GGUF_TYPES), with the chat template and end tokens in its metadata. The file is written
    beside `out` under a hidden name and renamed at the end: a kill never leaves half a file."""
    if quantize not in GGUF_TYPES:
        raise ExportError(f"--quantize {quantize}: choose one of {', '.join(GGUF_TYPES)}")
    script = converter(cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    f16 = out.with_name(f".{out.name}.f16.partial")
    try:
        if quantize in CONVERTER_TYPES:
            run_converter(script, merged, partial, CONVERTER_TYPES[quantize])
        else:
            run_converter(script, merged, f16, "f16")
            quantise(f16, partial, quantize)
        check_metadata(partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
        f16.unlink(missing_ok=True)


def run_converter(script: Path, merged: Path, out: Path, outtype: str) -> None:
    print(f"Converting {merged} to GGUF {outtype} with llama.cpp's {CONVERTER}", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, not ours
    command = [sys.executable, str(script), str(merged), "--outfile", str(out), "--outtype", outtype]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode == 0 and out.is_file():
        return
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit code {done.returncode}"
    if last.startswith("ModuleNotFoundError"):  # the converter's own requirements (sentencepiece...)
        raise ExportError(f"llama.cpp's converter needs a package ({last}): {REQUIREMENTS}")
    raise ExportError(f"llama.cpp's converter cannot convert {merged}: {last.removeprefix('ERROR:hf-to-gguf:')}")


# llama.cpp's quantiser, run in a Python of its own: its per-tensor log (hundreds of lines, on
# the C side) is captured like the converter's, and a crash in it is an error line, not ours.
QUANTISE = """import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))"""


def quantise(f16: Path, out: Path, quantize: str) -> None:
    """llama.cpp's quantiser, from the f16 file. Tensors whose rows are not a multiple of its
    block size (256 for the k-quants) get llama.cpp's fallback type, as with llama-quantize."""
    llama_cpp(ExportError)  # installed, or the line that says how
    print(f"Quantising to {quantize} with llama.cpp's quantiser", flush=True)
    command = [sys.executable, "-c", QUANTISE, str(f16), str(out), QUANTISER_TYPES[quantize]]
    done = subprocess.run(command, capture_output=True, text=True)
    said = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if done.returncode != 0 or not out.is_file():
        raise ExportError(f"llama.cpp's quantiser failed on {f16} ({said[-1] if said else done.returncode})")
    # e.g. "WARNING: 180 of 272 tensor(s) required fallback quantization": worth knowing.
    for line in said:
        if "fallback quantization" in line:
            print("llama.cpp's quantiser: " + line.split("WARNING: ", 1)[-1], flush=True)


def check_metadata(path: Path) -> None:
    """The chat template and the end token must be in the file: without them llama.cpp and
    Ollama format the chat wrongly and never stop (the classic "garbage in Ollama")."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    for key in (CHAT_TEMPLATE, EOS):
        if key not in fields or fields[key].contents() in ("", None):
            raise ExportError(f"the converter wrote no {key} into {path.name}: the merged model lacks it (re-merge it)")


def answers(gguf: Path, conversations: list[list[dict[str, str]]], max_new_tokens: int, threads: int) -> list[str]:
    """Greedy answers of the GGUF file through llama.cpp, formatted with the chat template stored
    in the file, stripped: as the held-out evaluation scores the adapter."""
    llm = open_gguf(gguf, threads, error=ExportError)
    try:
        tokenizer = GgufTokenizer(llm, ExportError)
        return [greedy(llm, tokenizer, messages, max_new_tokens) for messages in conversations]
    finally:
        llm.close()  # now: llama-cpp-python frees its model badly when left to the interpreter's exit
