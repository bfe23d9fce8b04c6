"""The chat engine on transformers (+ peft): the base model and the fine-tuned adapter.

Waiting requests are batched: one `model.generate` runs them together, left-padded, and a
stopping criterion hands each row's new token to its job and ends that row alone (end token,
stop string, its own limit, or its caller gone).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

from tuner.serving.engine import END_TOKENS, ChatEngine, EngineError, Row
from tuner.settings import adapter_dir, in_workspace, trained_with
from tuner.training.precision import Device, decide

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what peft's save_pretrained writes (Olive and TRL)


def load_adapter(model: Any, adapter: Path) -> Any:
    """`model` with the LoRA adapter of the folder `adapter` (peft). A damaged adapter or one
    made for another model is one EngineError naming the folder, as peft would otherwise fail
    with a traceback, or (weights under other names) warn and answer like the base model."""
    from peft import PeftModel
    from safetensors import SafetensorError, safe_open

    def bad(what: str) -> EngineError:
        return EngineError(f"the adapter in {adapter} {what}: fine-tune again: python finetuning/invoke_olive.py")

    try:
        if not isinstance(json.loads((adapter / "adapter_config.json").read_text("utf-8")), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise bad(f"has an unreadable adapter_config.json ({err})") from None
    try:  # reads the header only: a truncated or empty file fails here
        with safe_open(adapter / ADAPTER_WEIGHTS, "pt") as weights:
            saved = set(weights.keys())
    except (OSError, SafetensorError) as err:
        raise bad(f"has no readable {ADAPTER_WEIGHTS} ({err})") from None
    # peft warns with every key it missed; the check below says it in one line instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (ValueError, RuntimeError, TypeError, KeyError) as err:  # config or shapes not of this model
            raise bad(f"does not fit the base model ({first_line(err)})") from None
    # Keys as saved: peft drops the adapter name ("default") when it writes them.
    wanted = {key.replace(".default.", ".") for key in model.state_dict() if ".lora_" in key}
    if missing := sorted(wanted - saved):
        raise bad(f"lacks {len(missing)} of the {len(wanted)} LoRA weights of its config, e.g. {missing[0]}")
    return model


def first_line(err: Exception) -> str:
    """The telling line of a library's error: a size mismatch of the many it lists, else the first."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return next((line for line in lines if "mismatch" in line), lines[0])


class Engine(ChatEngine):
    """transformers (+ peft): the base model and the fine-tuned adapter."""

    max_batch = 16  # rows per generate: past this a CPU gains little and each row slows down
    has_logprobs = True

    def __init__(self, settings: dict[str, Any], root: Path, baseonly: bool = False) -> None:
        super().__init__()
        self.settings = settings
        model_path = in_workspace(root, settings["model"]["path"])
        adapter_path = adapter_dir(root)
        if not (model_path / "config.json").is_file():
            raise EngineError(f"base model not found in {model_path}: run `python setup/download_model.py` first")
        if not baseonly and not (adapter_path / "adapter_config.json").is_file():
            raise EngineError(
                f"adapter not found in {adapter_path}: run `python finetuning/invoke_olive.py` first "
                "(or chat with the base model: --baseonly)"
            )
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        # As the adapter was trained (its run.json; else the settings), in the precision policy's
        # dtype for this device: a QLoRA adapter on its 4-bit base, so that serving computes what
        # training and the held-out evaluation did.
        trained = (None if baseonly else trained_with(adapter_path)) or settings
        precision = decide(trained["train"], Device.detect())
        if precision.quantization is not None and importlib.util.find_spec("bitsandbytes") is None:
            raise EngineError(
                "this adapter was trained with QLoRA on a 4-bit base, which needs bitsandbytes: "
                "pip install -r setup/requirements-*.txt (it is pinned there)"
            )
        self.device = precision.device_map
        if settings["model"]["threads"]:  # 1 for tiny matrices: threads cost more than they save
            torch.set_num_threads(settings["model"]["threads"])
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, **precision.load_kwargs())
        if not baseonly:
            model = load_adapter(model, adapter_path)
            if precision.quantization is None:
                # Folded into the weights, the adapter costs nothing per token. A 4-bit base
                # keeps it apart: merging would round the adapter into 4 bits.
                model = model.merge_and_unload()
        self.model = model.eval()
        self.model_name = settings["model"]["id"] + ("" if baseonly else "-finetuned")
        vocab = self.tokenizer.get_vocab()
        ends = {vocab[t] for t in END_TOKENS if t in vocab}
        eos = self.model.generation_config.eos_token_id
        ends.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.end_ids = ends
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(ends, default=0))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 4096))

    def generate(self, rows: list[Row]) -> None:
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        torch = self.torch
        width = max(len(row.prompt) for row in rows)
        # Left padding, masked out: every row's next token comes from the last column.
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt)) + r.prompt for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=self.device)

        step: list[Any] = []  # the last step's log-probabilities, when a row asked for them

        class Remember(LogitsProcessor):
            """Before temperature, top-p and top-k (generate puts ours first): the model's own
            distribution, as OpenAI's logprobs give it. Only the last step is kept, not every step."""

            def __call__(self, input_ids: Any, scores: Any) -> Any:
                step[:] = [torch.log_softmax(scores.float(), dim=-1)]
                return scores

        def logprobs(i: int, token: int) -> tuple[float, list[tuple[int, float]]] | None:
            if rows[i].top is None:
                return None
            values, ids = step[0][i].topk(rows[i].top)
            return float(step[0][i, token]), list(zip(ids.tolist(), values.tolist(), strict=True))

        class Deliver(StoppingCriteria):
            """Called by generate after every step: each row takes its token, and says if it is done."""

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                last = input_ids[:, -1].tolist()
                done = [row.add(t, logprobs(i, t)) for i, (row, t) in enumerate(zip(rows, last, strict=True))]
                return torch.tensor(done, device=input_ids.device)

        temperature, top_p, top_k = rows[0].sampling
        options: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(row.limit for row in rows),
                pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([Deliver()]),
                logits_processor=LogitsProcessorList([Remember()] if any(r.top is not None for r in rows) else []),
                **options,
            )
