"""Build `tiny-random`: a tiny Phi-3-style model with a tokenizer trained on your dataset.

It needs no network, so the whole pipeline (fine-tune, chat, serve) can be tried and tested in
a minute on a laptop CPU. The weights are random: the model knows nothing until fine-tuned.

    python setup/build_tiny_model.py [--out model-cache/tiny-random] [--settings settings.toml]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuner.data import load_rows
from tuner.settings import in_workspace, run_script, script_parser, settings_for_script

ROOT = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Phi-3's chat format, kept in its own file because it is Jinja, not Python.
CHAT_TEMPLATE_FILE = ROOT / "setup" / "chat_template.jinja"


def corpus_texts(settings: dict[str, Any]) -> list[str]:
    """Every string of the dataset (all columns, all messages) and the system prompt."""
    rows = load_rows(settings, ROOT)
    texts = [settings["prompt"]["system"], settings["prompt"]["text_template"]]
    for row in rows:
        for value in row.values():
            if isinstance(value, list):  # chat messages
                texts.extend(str(m.get("content", "")) for m in value if isinstance(m, dict))
            else:
                texts.append(str(value))
    return texts


def main() -> None:
    parser = script_parser(__doc__, ROOT, "dataset.path=dataset/other.jsonl")
    parser.add_argument("--out", type=Path, help="output folder (default: [model] path)")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = settings_for_script(args.settings, args.overrides)
    out = args.out or in_workspace(ROOT, settings["model"]["path"])

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

    # Byte-level BPE: any text can be encoded, so chat with unseen words still works.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(settings), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None
    )
    chat_template = CHAT_TEMPLATE_FILE.read_text("utf-8").rstrip("\n")
    tokenizer.chat_template = chat_template
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")]

    torch.manual_seed(args.seed)
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        # A wide init gives the random model the large activations LoRA needs to learn fast.
        initializer_range=0.1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=eos_ids,
        tie_word_embeddings=False,
    )
    model = Phi3ForCausalLM(config)
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers 5 reads chat_template.jinja; 4.x reads tokenizer_config.json: write both.
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text("utf-8"))
    tok_config["chat_template"] = chat_template
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2), "utf-8")
    (out / "chat_template.jinja").write_text(chat_template, "utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny-random: {n_params:,} parameters, vocabulary {len(tokenizer)}, saved to {out}")


if __name__ == "__main__":
    run_script(main)
