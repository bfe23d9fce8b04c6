"""The chat engine on llama.cpp (llama-cpp-python): the GGUF export, as llama.cpp and Ollama run it.

It serves `inference/export.py --format gguf`'s file ([export] quantize picks which one) behind
the same console, page and OpenAI-compatible API as the other backends. The prompt is made with
the chat template stored IN the GGUF file, so what is served is what was exported and checked.

The functions below are shared with tuner/export/gguf.py, which asks the export the held-out
questions through them: the check and the server run the file the same way.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuner.serving.engine import END_TOKENS, ChatEngine, EngineError, Row
from tuner.settings import WorkspaceError, in_workspace

# llama-cpp-python has no wheel on PyPI for most platforms: pip builds llama.cpp from its sdist.
INSTALL = "pip install -r setup/requirements-gguf.txt (it builds llama.cpp from source: about 7 minutes on 2 cores)"
# llama.cpp allocates the KV cache for the whole context up front: a 128k-token context of the
# catalog's Llama 3.x would take gigabytes before the first question. Chats here are short.
MAX_CONTEXT = 8192
# llama.cpp's extra weight layouts for the CPU (AMX tiles, repacked blocks): faster where they
# work, but they crashed llama.cpp on a virtual machine whose CPU reports AMX. True to use them.
REPACK = False
CHAT_TEMPLATE = "tokenizer.chat_template"  # GGUF metadata keys (llama.cpp's names)


def llama_cpp(error: type[WorkspaceError] = EngineError) -> Any:
    """The llama_cpp module, or `error` saying how to install it."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as err:
        raise error(f"llama-cpp-python is not installed ({err}): {INSTALL}") from None


def open_gguf(path: Path, threads: int, context: int = MAX_CONTEXT, error: type[WorkspaceError] = EngineError) -> Any:
    """The GGUF file `path` loaded by llama.cpp (CPU threads: 0 for llama.cpp's default)."""
    module = llama_cpp(error)
    low_level = module.llama_cpp  # the ctypes bindings, where Llama() gets its model parameters
    defaults = low_level.llama_model_default_params

    def without_repacking() -> Any:
        # llama.cpp's --no-repack (see REPACK), which Llama() has no argument for.
        params = defaults()
        params.use_extra_bufts = REPACK
        return params

    try:
        low_level.llama_model_default_params = without_repacking
        return module.Llama(
            str(path),
            n_ctx=min(trained_context(path) or context, context),
            n_threads=threads or None,
            n_threads_batch=threads or None,
            verbose=False,  # llama.cpp's load log; failures still raise
        )
    except (ValueError, RuntimeError, OSError) as err:  # a damaged or missing file
        raise error(f"llama.cpp cannot load {path} ({err}): export it again") from None
    finally:
        low_level.llama_model_default_params = defaults


def trained_context(path: Path) -> int:
    """The context length the model was trained for (0: not said), from the file's metadata."""
    from gguf import GGUFReader  # reads the header only (the tensors are memory-mapped, not read)

    fields = GGUFReader(path).fields
    return next((int(f.contents()) for k, f in fields.items() if k.endswith(".context_length")), 0)


class GgufTokenizer:
    """The GGUF's own tokenizer (llama.cpp's), with the two calls the engine's rows make."""

    def __init__(self, llm: Any, error: type[WorkspaceError] = EngineError) -> None:
        self.llm = llm
        template = llm.metadata.get(CHAT_TEMPLATE)
        if not template:
            raise error(f"the GGUF file has no {CHAT_TEMPLATE} in its metadata: export it again")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        # Rendered as transformers renders chat templates (same Jinja sandbox and extensions).
        piece = llm.detokenize  # special tokens' text (bos_token, eos_token in the template)
        self.format = Jinja2ChatFormatter(
            template,
            eos_token=piece([llm.token_eos()], special=True).decode("utf-8", "replace"),
            bos_token=piece([llm.token_bos()], special=True).decode("utf-8", "replace") if llm.token_bos() >= 0 else "",
            add_generation_prompt=True,
        )

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.format(messages=messages).prompt  # type: ignore[arg-type]
        # No BOS of our own: the template writes it where the model wants one (as the torch engine
        # tokenizes with add_special_tokens=False).
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.llm.detokenize(ids, special=not skip_special_tokens).decode("utf-8", "replace")

    def end_ids(self) -> set[int]:
        """llama.cpp's end-of-generation tokens: EOS, and the end-of-turn tokens of the template."""
        llm, ends = self.llm, {self.llm.token_eos()}
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            if key in llm.metadata:
                ends.add(int(llm.metadata[key]))
        for text in END_TOKENS:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if len(ids) == 1 and self.decode(ids, skip_special_tokens=False) == text:
                ends.add(ids[0])
        return ends


def greedy(llm: Any, tokenizer: GgufTokenizer, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    """The greedy answer to `messages`, end token excluded, stripped (as the held-out evaluation)."""
    ends, out = tokenizer.end_ids(), []
    for token in llm.generate(tokenizer.prompt_ids(messages), temp=0.0, top_k=1, top_p=1.0, min_p=0.0):
        if token in ends or len(out) >= max_new_tokens:
            break
        out.append(token)
    return tokenizer.decode(out).strip()


class LlamaCppEngine(ChatEngine):
    """llama.cpp: the GGUF export ([export] quantize), one answer at a time."""

    has_logprobs = True

    def __init__(self, settings: dict[str, Any], root: Path, baseonly: bool = False) -> None:
        super().__init__()
        if baseonly:
            raise EngineError("the gguf backend serves the fine-tuned export only: use --backend torch for the base")
        self.settings = settings
        kind = settings["export"]["quantize"]
        # tuner.export.export_folder's name for it (serving never imports the export layer).
        folder = in_workspace(root, settings["export"]["output_dir"]) / f"gguf-{kind}"
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise EngineError(
                f"no GGUF export in {folder}: run `python inference/export.py --format gguf --quantize {kind}` first"
            )
        self.llm = open_gguf(files[0], settings["model"]["threads"])
        self.tokenizer = GgufTokenizer(self.llm)
        self.end_ids = self.tokenizer.end_ids()
        self.context = self.llm.n_ctx()
        self.model_name = settings["model"]["id"] + f"-finetuned-gguf-{kind}"

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.prompt_ids(messages)

    def generate(self, rows: list[Row]) -> None:
        import numpy as np

        step: list[Any] = []  # the log-probabilities of the last step, when a row asks for them

        def remember(input_ids: Any, scores: Any) -> Any:
            """The model's own distribution before temperature, top-p and top-k (OpenAI's logprobs)."""
            step[:] = [scores - np.logaddexp.reduce(scores)]
            return scores

        for row in rows:
            temperature, top_p, top_k = row.sampling
            options: dict[str, Any] = {"temp": temperature, "top_p": top_p, "top_k": top_k, "min_p": 0.0}
            if row.top is not None:
                options["logits_processor"] = [remember]
            for token in self._tokens(row.prompt, options):
                logprobs = None
                if row.top is not None and step:
                    best = np.argsort(step[0])[::-1][: row.top]
                    logprobs = (float(step[0][token]), [(int(i), float(step[0][i])) for i in best])
                if row.add(token, logprobs):
                    break
            row.finish()

    def _tokens(self, ids: list[int], options: dict[str, Any]) -> Iterator[int]:
        # temp 0 is llama.cpp's greedy sampler; top_k 0 is no limit, as in [chat] top_k.
        yield from self.llm.generate(ids, **options)
