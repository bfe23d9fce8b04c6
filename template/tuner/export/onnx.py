"""Building ONNX Runtime GenAI models: the base with the LoRA adapter as graph inputs, the
adapter file, and the merged model (tuner.export.merged, then built). `python inference/export.py
--format onnx` drives these steps.

The model builder needs two repairs for our models, applied while it runs: Phi-3's
original_max_position_embeddings, and an LM head found by shape (lm_head_by_identity).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuner.export import ExportError
from tuner.serving.ort import ADAPTER_FILE

ADAPTER_NAME = "finetuned"
# The model builder names the two LoRA MatMuls of a projection <projection>/lora_A/MatMul and
# <projection>/lora_B/MatMul; it splits packed projections (qkv_proj, gate_up_proj) first.
LORA_NODE = re.compile(r"/lora_[AB]/MatMul$")
LORA_RANK = "lora_r"  # symbolic dimension: adapters of any rank fit the same model


def lora_node_names(num_layers: int) -> list[str]:
    """The builder's names for the LoRA MatMuls (decoder models of the catalog), so the int4
    quantizer leaves them in float: the adapter file then holds plain float weights."""
    projections = [f"attn/{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [f"mlp/{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return [f"/model/layers.{i}/{p}/lora_{ab}/MatMul" for i in range(num_layers) for p in projections for ab in "AB"]


def build(model_dir: Path, out: Path, precision: str, provider: str, cache: Path, adapter: Path | None) -> None:
    """Run onnxruntime-genai's model builder on a Hugging Face model folder.

    We call the builder directly rather than through Olive's ModelBuilder pass: Olive 0.13's
    pass imports onnxruntime_genai.models.quantized_model, a module onnxruntime-genai 0.15
    removed, so the pass fails before building anything.
    """
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    options = [f"adapter_path={adapter}"] if adapter else []
    if adapter and precision == "int4":
        config = json.loads((model_dir / "config.json").read_text("utf-8"))
        options.append("nodes_to_exclude=" + ",".join(lora_node_names(int(config["num_hidden_layers"]))))
    extra = parse_extra_options(None, str(model_dir), str(out), precision, provider, str(cache), options)
    config = extra["hf_details"]["hf_config"]
    # Phi-3 configs carry original_max_position_embeddings (4096 by default) even without
    # LongRoPE; the builder takes any difference from max_position_embeddings as LongRoPE and
    # then fails for lack of its factors. Without rope scaling the value means nothing: align it.
    scaling = getattr(config, "rope_scaling", None) or {}
    if hasattr(config, "original_max_position_embeddings") and "long_factor" not in scaling:
        config.original_max_position_embeddings = config.max_position_embeddings
    with lm_head_by_identity():
        create_model(None, str(model_dir), str(out), precision, provider, str(cache), **extra)


@contextlib.contextmanager
def lm_head_by_identity() -> Iterator[None]:
    """The builder takes every Linear layer with vocab_size outputs for the LM head. Where
    another layer happens to have that width (a small model whose gate_up_proj is 2 x 512 = 1024
    wide, the size of its vocabulary), it emits a second head mid-network and the logits come out wrong. While
    building, accept only the model's own output embedding as the head."""
    import onnxruntime_genai.models.builder  # noqa: F401  (makes its `builders` modules importable)

    # The builder imports its modules as top-level `builders.*`: patch the class it uses.
    base = sys.modules.get("builders.base") or importlib.import_module("onnxruntime_genai.models.builders.base")
    Model = base.Model
    original = Model.has_lm_head

    def has_lm_head(self: Any, module: Any) -> bool:
        if not original(self, module):
            return False
        get_head = getattr(self.weights, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        return head is None or module is head

    Model.has_lm_head = has_lm_head
    try:
        yield
    finally:
        Model.has_lm_head = original


def extract_adapter(src: Path, dst: Path) -> int:
    """Turn the LoRA weights the builder baked into src/model.onnx into graph inputs and save
    them to dst/adapter.onnx_adapter. Returns the number of adapter tensors.

    Each input keeps a default: an empty tensor (rank 0), which adds nothing, so the model
    without an adapter is the base model. Our own code rather than Olive's ExtractAdapters
    pass: that pass lists the adapter inputs twice in the graph, which onnx.checker rejects,
    and `olive convert-adapters` names the weights differently from the builder's graph.
    """
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort

    model = ir.load(src / "model.onnx")
    weights: dict[str, np.ndarray] = {}
    quantized = []
    for node in model.graph:
        if not LORA_NODE.search(node.name or ""):
            continue
        if node.op_type != "MatMul":
            quantized.append(node.name)
            continue
        value = node.inputs[1]
        if value is None or value.const_value is None or value.name in weights:
            continue
        array = value.const_value.numpy()
        weights[value.name] = np.ascontiguousarray(array)
        # lora_A is [in, r], lora_B is [r, out]: r becomes a symbolic dimension.
        is_a = "/lora_A/" in node.name
        dims = [array.shape[0], LORA_RANK] if is_a else [LORA_RANK, array.shape[1]]
        empty = np.zeros((array.shape[0], 0) if is_a else (0, array.shape[1]), dtype=array.dtype)
        value.const_value = ir.tensor(empty, name=value.name)
        value.shape = ir.Shape(dims)
        model.graph.inputs.append(value)
    if quantized:
        raise ExportError(
            f"the builder quantized the LoRA MatMuls ({quantized[0]}, ...); export with --precision fp16 or fp32"
        )
    if not weights:
        raise ExportError(f"no LoRA weights found in {src / 'model.onnx'}: the builder ignored the adapter")
    dst.mkdir(parents=True, exist_ok=True)
    ir.save(model, dst / "model.onnx", external_data="model.onnx.data")

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in weights.items()})
    adapter.export_adapter(str(dst / ADAPTER_FILE))
    return len(weights)
