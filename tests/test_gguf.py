"""tuner/export/gguf.py and the gguf chat backend: llama.cpp's own converter and quantiser, the
GGUF's metadata, its answers against transformers', and the file served behind the API.

tiny-random cannot be converted: it is a Phi-3, whose converter reads a sentencepiece
tokenizer.model, and its tokenizer is a byte-level BPE trained on the dataset (as a BPE, its
pre-tokenizer would be unknown to llama.cpp, which recognises them by a hash of their output), so
convert() refuses it in one line. The small model here is a random 2-layer Llama
with SmolLM2's tokenizer (from the smol_base workspace), 256 wide so that the k-quants of
q4_k_m apply to its matrices rather than llama.cpp's fallback types. Answers are compared on
SmolLM2-135M-Instruct itself: a random model's near-equal logits would make greedy answers
differ on rounding alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tuner.export import ExportError, export_folder
from tuner.export.gguf import answers, convert, converter
from tuner.serving.engine import EngineError, formatted
from tuner.settings import GGUF_TYPES, load_settings

# general.file_type (llama.cpp's LLAMA_FTYPE) and the type of the attention matrices, per --quantize.
FILE_TYPES = {"f16": (1, "F16"), "q8_0": (7, "Q8_0"), "q4_k_m": (15, "Q4_K")}


@pytest.fixture(scope="session")
def llama_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("llama.cpp")
    converter(cache)
    return cache


def save_merged(model: Any, tokenizer: Any, out: Path) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_merged(smol_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merged folder as inference/export.py --format merged writes it: a LoRA adapter (random,
    so that merging changes the weights) folded into a random Llama by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smol_base / load_settings(smol_base / "settings.toml")["model"]["path"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    merged = get_peft_model(LlamaForCausalLM(config), lora).merge_and_unload()
    return save_merged(merged, tokenizer, tmp_path_factory.mktemp("tiny-merged"))


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_merged: Path, llama_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ggufs")
    files = {kind: out / f"model-{kind}.gguf" for kind in GGUF_TYPES}
    for kind, path in files.items():
        convert(tiny_merged, path, kind, llama_cache)
    return files


def test_every_type_with_its_metadata(tiny_ggufs: dict[str, Path], tiny_merged: Path) -> None:
    """f16 and q8_0 by the converter, q4_k_m quantised from f16; each with the chat template and
    the end-of-turn token of the merged model; nothing else left in the folder."""
    from gguf import GGUFReader

    template = (tiny_merged / "chat_template.jinja").read_text("utf-8")
    for kind, path in tiny_ggufs.items():
        reader = GGUFReader(path)
        fields = reader.fields
        file_type, matrix_type = FILE_TYPES[kind]
        assert fields["general.file_type"].contents() == file_type, kind
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == matrix_type, (kind, types)
        assert fields["tokenizer.chat_template"].contents() == template
        eos = fields["tokenizer.ggml.eos_token_id"].contents()
        assert fields["tokenizer.ggml.tokens"].contents()[eos] == "<|im_end|>"
    sizes = [tiny_ggufs[kind].stat().st_size for kind in ("f16", "q8_0", "q4_k_m")]
    assert sizes == sorted(sizes, reverse=True), sizes
    assert sorted(p.name for p in tiny_ggufs["f16"].parent.iterdir()) == sorted(p.name for p in tiny_ggufs.values())


def test_what_it_refuses_in_one_line(tiny_merged: Path, llama_cache: Path, tmp_path: Path, tiny_built: Path) -> None:
    with pytest.raises(ExportError, match="choose one of f16, q8_0, q4_k_m"):
        convert(tiny_merged, tmp_path / "m.gguf", "q5_k", llama_cache)
    # tiny-random: a Phi-3 without the sentencepiece tokenizer llama.cpp's converter reads for one.
    settings = load_settings(tiny_built / "settings.toml")
    with pytest.raises(ExportError, match="llama.cpp's converter cannot convert .*tokenizer.model") as err:
        convert(tiny_built / settings["model"]["path"], tmp_path / "m.gguf", "f16", llama_cache)
    assert "\n" not in str(err.value)
    # A merged folder without a chat template: the GGUF would format chats wrongly in llama.cpp and Ollama.
    bare = tmp_path / "bare"
    bare.mkdir()
    for item in tiny_merged.iterdir():
        if item.name != "chat_template.jinja":
            (bare / item.name).symlink_to(item)
    with pytest.raises(ExportError, match="wrote no tokenizer.chat_template"):
        convert(bare, tmp_path / "m.gguf", "f16", llama_cache)
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*partial")) == []


def test_the_converter_is_fetched_once_and_never_half(llama_cache: Path, tmp_path: Path) -> None:
    from conftest import killed_at_swap

    script = converter(llama_cache)
    assert script == converter(llama_cache) and (script.parent / "gguf-py" / "gguf" / "gguf_writer.py").is_file()
    cache = tmp_path / "cache"
    killed_at_swap(cache / script.parent.name, lambda: converter(cache))
    # Killed as the unpacked converter was moved into place: none there, only a hidden leftover.
    assert not (cache / script.parent.name).exists() and list(cache.glob(".fetch-*"))
    assert converter(cache).is_file() and not list(cache.glob(".fetch-*"))


def test_f16_answers_as_transformers(smol_base: Path, llama_cache: Path, tmp_path: Path) -> None:
    """The held-out questions through llama.cpp (the chat template stored in the GGUF) get the
    greedy answers of transformers on the same weights (SmolLM2-135M-Instruct saved as a merged
    folder is: a plain transformers folder). Its answers are sentences, not labels: f16 rounding
    may flip a near-tie late in one of them, never more."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tuner.data import load_rows, split_rows, to_messages
    from tuner.training.evaluation import generate

    settings = load_settings(smol_base / "settings.toml")
    base = smol_base / settings["model"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    merged = save_merged(model, tokenizer, tmp_path / "merged")
    convert(merged, tmp_path / "model-f16.gguf", "f16", llama_cache)

    _, held_out = split_rows(load_rows(settings, smol_base), settings["train"]["eval_split"], 42)
    asked = [to_messages(row, settings)[:-1] for row in held_out[:8]]
    tokenizer.padding_side = "left"
    expected = [generate(model, tokenizer, [chat], 12)[0] for chat in asked]  # one at a time: no padding
    got = answers(tmp_path / "model-f16.gguf", asked, 12, threads=1)
    assert sum(a == e for a, e in zip(got, expected, strict=True)) >= len(asked) - 1, (got, expected)
    assert all(a.split()[:4] == e.split()[:4] and len(e.split()) >= 4 for a, e in zip(got, expected, strict=True))


# ---------------------------------------------------------------- the gguf backend behind the API


@pytest.fixture(scope="module")
def gguf_engine(smol_base: Path, tiny_ggufs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """LlamaCppEngine on the q8_0 file, put where inference/export.py puts it."""
    from tuner.serving import load_engine

    settings = load_settings(smol_base / "settings.toml")
    settings["model"]["threads"] = 1
    root = tmp_path_factory.mktemp("gguf-ws")
    with pytest.raises(EngineError, match=r"run `python inference/export.py --format gguf --quantize q8_0` first"):
        load_engine(settings, root, "gguf")
    folder = export_folder(settings, root, "gguf", "q8_0")
    folder.mkdir(parents=True)
    (folder / "model-q8_0.gguf").symlink_to(tiny_ggufs["q8_0"])
    with pytest.raises(EngineError, match="serves the fine-tuned export only"):
        load_engine(settings, root, "gguf", baseonly=True)
    return load_engine(settings, root, "gguf")


def test_the_api_answers_with_the_gguf(gguf_engine: Any) -> None:
    """/v1/chat/completions: the plain answer is the engine's own greedy one, streaming gives the
    same text, and logprobs are llama.cpp's (the greedy token is the most likely one)."""
    from tuner.serving.api import create_app

    key = "gguf-key-5e1"
    messages = [{"role": "user", "content": "The bus was late again."}]
    expected = gguf_engine.reply(formatted(messages, gguf_engine.settings), max_new_tokens=10, temperature=0)
    assert expected and gguf_engine.model_name.endswith("-gguf-q8_0")
    body = {"messages": messages, "max_tokens": 10, "temperature": 0}
    with TestClient(create_app(gguf_engine, key), headers={"Authorization": f"Bearer {key}"}) as client:
        plain = client.post("/v1/chat/completions", json=body).json()
        assert plain["choices"][0]["message"]["content"] == expected, plain
        assert plain["usage"]["completion_tokens"] <= 10
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        events = [e.removeprefix("data: ") for e in streamed.text.split("\n\n") if e.startswith("data: {")]
        pieces = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events]
        assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1
        scored = client.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 3}).json()
    tokens = scored["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens).startswith(expected[:5])
    for token in tokens:
        assert token["top_logprobs"][0]["token"] == token["token"] and token["logprob"] <= 0
        assert token["logprob"] == pytest.approx(token["top_logprobs"][0]["logprob"])
