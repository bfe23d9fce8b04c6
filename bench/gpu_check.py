"""The helpers of bench/gpu_check.sh (read that first): the offline model, the measuring wrapper,
the precision policy's choices and the final table.

    python bench/gpu_check.py render WS PLATFORM         # a workspace from this checkout's template
    python bench/gpu_check.py model WS [--small]         # random SmolLM2-135M-shaped model in WS
    python bench/gpu_check.py run STATS.json -- SCRIPT ARGS...  # run a workspace script, measured
    python bench/gpu_check.py precision WS               # tuner.training.precision's choices here, as JSON
    python bench/gpu_check.py meta DIR MODE              # the machine and package versions
    python bench/gpu_check.py table DIR                  # DIR/*.json -> one table on stdout
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import resource
import runpy
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()  # a run's wall time counts its imports too, as `python SCRIPT` would
# SmolLM2-135M's shape (its config.json): what the GPU check trains. --small: the CPU plumbing run.
FULL = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3}
FULL |= {"intermediate_size": 1536, "vocab_size": 49152}
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
SMALL |= {"intermediate_size": 128, "vocab_size": 1024}
MODEL_ID = "smollm2-135m-random"
REPO = Path(__file__).resolve().parents[1]


def render(ws: Path, platform: str) -> None:
    """The workspace, rendered from a plain copy of the template as the tests do: the tree that
    travels to the GPU machine is no git repository, and copier renders a folder as it is."""
    from copier import run_copy

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ruff_cache", ".pytest_cache")
        for name in ("template", "includes"):
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        shutil.copy2(REPO / "copier.yml", src / "copier.yml")
        data = {"project_name": "gpu-check", "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "platform": platform}
        run_copy(str(src), str(ws), data=data, defaults=True, quiet=True, vcs_ref=None)


def meta(folder: Path, mode: str) -> None:
    """What the table's title says: the device and the versions that decide the numbers."""
    import importlib.metadata as md

    import torch

    versions = []
    for name in ("torch", "transformers", "peft", "trl", "olive-ai", "bitsandbytes"):
        try:
            versions.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            versions.append(f"{name} missing")
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    record = {"device": device, "model": MODEL_ID, "mode": mode, "versions": ", ".join(versions)}
    (folder / "meta.json").write_text(json.dumps(record), "utf-8")


def set_model(ws: Path) -> Path:
    """Point [model] at a locally built model: hf_repo = "" makes setup/download_model.py (which
    the benches call) find it built instead of reaching for the Hub, which the GPU machine lacks."""
    path = ws / "settings.toml"
    text = path.read_text("utf-8")
    section, rest = text.split("\n[dataset]", 1)
    for key, value in (("id", MODEL_ID), ("hf_repo", ""), ("path", f"model-cache/{MODEL_ID}")):
        section = re.sub(rf"^{key} = .*$", f"{key} = {json.dumps(value)}", section, count=1, flags=re.M)
    path.write_text(section + "\n[dataset]" + rest, "utf-8")
    return ws / "model-cache" / MODEL_ID


def build_model(ws: Path, small: bool) -> None:
    """A llama model of SmolLM2-135M's dimensions with random weights, and a byte-level BPE
    tokenizer trained on the workspace's dataset (as setup/build_tiny_model.py builds tiny-random):
    no download. Speed and memory depend on the shapes, not on the weights' values."""
    sys.path.insert(0, str(ws))
    spec = importlib.util.spec_from_file_location("build_tiny_model", ws / "setup" / "build_tiny_model.py")
    assert spec and spec.loader
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)  # its corpus, special tokens and chat template, reused
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tuner.settings import load_settings

    out = set_model(ws)
    dims = SMALL if small else FULL
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=dims["vocab_size"],  # a small corpus gives fewer; the embedding keeps the full size
        special_tokens=tiny.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny.corpus_texts(load_settings(ws / "settings.toml")), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None
    )
    tokenizer.chat_template = tiny.CHAT_TEMPLATE_FILE.read_text("utf-8").rstrip("\n")
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")]
    torch.manual_seed(0)
    config = LlamaConfig(
        **dims,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,  # as SmolLM2-135M
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=eos_ids,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(tokenizer.chat_template, "utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{MODEL_ID}: {n_params / 1e6:.1f}M parameters, tokenizer {len(tokenizer)} tokens, in {out}")


class MemoryPoll:
    """The GPU's used memory, polled through NVML: what nvidia-smi shows, the CUDA context and any
    other process of the run included (torch's own counter sees only this process's tensors)."""

    def __init__(self) -> None:
        self.peak = 0
        self.stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVIDIA driver or no nvidia-ml-py: torch's counter alone
            self.nvml = None
            return
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self) -> None:
        while not self.stop.wait(0.1):
            self.peak = max(self.peak, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)


def run_measured(stats_path: Path, script: list[str]) -> int:
    """Run a workspace script in this process (so torch's peak-memory counter sees its tensors) and
    write what it cost to `stats_path`. Trainer.train is wrapped to time the training loop alone
    and count its tokens: the script's wall time also holds imports, model loading and saving."""
    import torch
    import transformers

    train_seen: dict[str, Any] = {}
    original = transformers.Trainer.train

    def timed_train(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Counting real tokens (padding excluded) costs one sync per step, small beside a step.
        self.args.include_num_input_tokens_seen = "non_padding"
        start = time.perf_counter()
        result = original(self, *args, **kwargs)
        train_seen.update(
            seconds=time.perf_counter() - start,
            steps=self.state.global_step,
            tokens=self.state.num_input_tokens_seen,
        )
        return result

    transformers.Trainer.train = timed_train  # type: ignore[method-assign]
    poll = MemoryPoll()
    sys.argv = script
    sys.path[0] = str(Path(script[0]).resolve().parent)  # as `python SCRIPT` would have it
    code = 0
    try:
        runpy.run_path(script[0], run_name="__main__")
    except SystemExit as err:  # the scripts end with sys.exit on errors (a message, or a code)
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        if isinstance(err.code, str):
            print(err.code, file=sys.stderr)
    poll.stop.set()
    cuda = torch.cuda.is_available()
    stats = {
        "code": code,
        "wall_s": time.perf_counter() - STARTED,
        "train": train_seen,
        "peak_alloc_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "peak_device_mib": poll.peak / 2**20 if poll.nvml else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    stats_path.write_text(json.dumps(stats), "utf-8")
    return code


def precision(ws: Path) -> None:
    """tuner.training.precision's choices on this machine, for LoRA and QLoRA, from the workspace's [train]."""
    sys.path.insert(0, str(ws))
    from tuner.settings import load_settings
    from tuner.training.precision import Device, decide

    train = load_settings(ws / "settings.toml")["train"]
    device = Device.detect()
    choices = {}
    for method in ("lora", "qlora"):
        p = decide(train | {"method": method}, device)
        quant = p.quantization and f"4-bit {p.quantization['bnb_4bit_quant_type']}"
        choices[method] = {"compute": p.compute_dtype, "weights": p.weights_dtype, "quantization": quant}
        choices[method] |= {"device_map": p.device_map, "note": p.note}
    print(json.dumps({"device": device.name, "asked": train["compute_dtype"], "choices": choices}))


def table(folder: Path) -> None:
    """One table of everything the check measured: the fine-tuning runs, the precision policy and
    the benches' summary lines."""
    meta = json.loads((folder / "meta.json").read_text("utf-8"))
    print(f"\nGPU check: {meta['device']}, {meta['model']}, {meta['mode']} mode, {meta['versions']}")
    head = f"{'run':34} {'result':8} {'wall s':>7} {'train s':>7} {'steps':>5} {'tokens':>7} {'tokens/s':>9}"
    print(head + f" {'peak alloc MiB':>14} {'peak GPU MiB':>12} {'peak RSS MiB':>12}")
    for path in sorted(folder.glob("run-*.json")):
        s = json.loads(path.read_text("utf-8"))
        t = s["train"]
        rate = t["tokens"] / t["seconds"] if t.get("seconds") else None
        log = path.with_suffix(".log")
        refused = log.is_file() and "QLoRA needs" in log.read_text("utf-8", errors="replace")
        result = "ok" if s["code"] == 0 else ("refused" if refused else f"exit {s['code']}")
        cells = [f"{path.stem[4:]:34} {result:8} {s['wall_s']:7.1f}"]
        cells += [fmt(t.get("seconds"), 7, 1), fmt(t.get("steps"), 5), fmt(t.get("tokens"), 7), fmt(rate, 9)]
        cells += [fmt(s["peak_alloc_mib"], 14), fmt(s["peak_device_mib"], 12), fmt(s["peak_rss_mib"], 12)]
        print(" ".join(cells))
    policy = json.loads((folder / "precision.json").read_text("utf-8"))
    for method, c in policy["choices"].items():
        line = f"precision {method:5} on {policy['device']}: compute {c['compute']}, weights {c['weights']}"
        line += f", {c['quantization'] or 'no quantization'}, device_map {c['device_map']}"
        print(line + (f" ({c['note']})" if c["note"] else ""))
    for name in ("train_speed", "decode_speed"):
        path = folder / f"{name}.txt"
        text = path.read_text("utf-8") if path.is_file() else "(not run)"
        print(f"{name}: " + "\n  ".join(line for line in text.strip().splitlines() if line.strip()))


def fmt(value: float | int | None, width: int, digits: int = 0) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    render_args = sub.add_parser("render")
    render_args.add_argument("workspace", type=Path)
    render_args.add_argument("platform", choices=["cuda", "cpu"])
    meta_args = sub.add_parser("meta")
    meta_args.add_argument("folder", type=Path)
    meta_args.add_argument("mode")
    model = sub.add_parser("model")
    model.add_argument("workspace", type=Path)
    model.add_argument("--small", action="store_true")
    run = sub.add_parser("run")
    run.add_argument("stats", type=Path)
    run.add_argument("script", nargs=argparse.REMAINDER)
    sub.add_parser("precision").add_argument("workspace", type=Path)
    sub.add_parser("table").add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "render":
        render(args.workspace, args.platform)
    elif args.command == "meta":
        meta(args.folder, args.mode)
    elif args.command == "model":
        build_model(args.workspace.resolve(), args.small)
    elif args.command == "run":
        script = args.script[1:] if args.script[:1] == ["--"] else args.script
        sys.exit(run_measured(args.stats, script))
    elif args.command == "precision":
        precision(args.workspace.resolve())
    else:
        table(args.folder)


if __name__ == "__main__":
    main()
