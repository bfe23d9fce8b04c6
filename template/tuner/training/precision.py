"""The one precision policy: from [train] and the device, the dtype the matrices are computed in,
the dtype the weights load in, the 4-bit config of a QLoRA base and where the model goes. Used by
both trainers (Olive and TRL), the held-out evaluation, the torch engine and vLLM's command line,
so that a model is trained, scored and served in the same precision.

The rules:
- CPU: float32 (bfloat16 and float16 matmuls are slow on most CPUs, and float16 training diverges).
- CUDA: bfloat16 only where the GPU computes it natively (compute capability 8.0 or newer: A100,
  H100, RTX 30xx+). torch's is_bf16_supported() also says yes on T4 and V100 (sm75, sm70), where
  bfloat16 is emulated many times slower: those compute in float16 instead.
- float16 weights train unstably: they load in float32 and the Trainer computes in float16
  (mixed precision), as Olive does.
- QLoRA: the base in 4-bit (bitsandbytes, which runs on CUDA and on the CPU), computing in the
  dtype above.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Device:
    """What the policy needs to know of the machine. Tests build one instead of asking torch."""

    cuda: bool
    capability: tuple[int, int] = (0, 0)  # the first GPU's compute capability, (0, 0) without CUDA

    @classmethod
    def detect(cls) -> Device:
        import torch

        if not torch.cuda.is_available():
            return cls(cuda=False)
        major, minor = torch.cuda.get_device_capability(0)
        return cls(cuda=True, capability=(major, minor))

    @property
    def native_bf16(self) -> bool:
        return self.cuda and self.capability >= (8, 0)

    @property
    def name(self) -> str:
        return f"cuda sm{self.capability[0]}{self.capability[1]}" if self.cuda else "cpu"


@dataclass(frozen=True)
class Precision:
    compute_dtype: str  # the matmuls: "bfloat16" | "float16" | "float32"
    weights_dtype: str  # what the weights (all but a 4-bit base's linear layers) load in
    quantization: dict[str, Any] | None  # BitsAndBytesConfig's arguments for a QLoRA base, else None
    device_map: Any  # from_pretrained's device_map: "cuda", "cpu" or None (the launcher places it)
    note: str  # "" or one line that says where the policy overrode [train] compute_dtype

    @property
    def mixed(self) -> bool:
        """float16 compute over float32 weights: the Trainer's fp16 mixed precision."""
        return self.compute_dtype == "float16"

    def bnb_config(self) -> Any:
        """transformers' BitsAndBytesConfig for a QLoRA base (None for LoRA)."""
        if self.quantization is None:
            return None
        import torch
        from transformers import BitsAndBytesConfig

        args = dict(self.quantization)
        for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if key in args:
                args[key] = getattr(torch, args[key])
        return BitsAndBytesConfig(**args)

    def load_kwargs(self) -> dict[str, Any]:
        """from_pretrained's arguments: dtype, the 4-bit config and the device map."""
        kwargs: dict[str, Any] = {"dtype": self.weights_dtype}
        if self.quantization is not None:
            kwargs["quantization_config"] = self.bnb_config()
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        return kwargs


def compute_dtype(requested: str, device: Device) -> str:
    """[train] compute_dtype as this device can compute it."""
    if not device.cuda:
        return "float32"
    if requested == "bfloat16" and not device.native_bf16:
        return "float16"
    return requested


def decide(train: dict[str, Any], device: Device, processes: int = 1, fsdp: bool = False) -> Precision:
    """The precision of one model (training, evaluation or serving) from the [train] it was or is
    trained with. `processes` > 1: each process of a launcher places its own copy (no device_map)."""
    compute = compute_dtype(train["compute_dtype"], device)
    weights = "float32" if compute == "float16" else compute
    note = ""
    if compute != train["compute_dtype"]:
        why = "no native bfloat16 on this GPU" if device.cuda else "the CPU computes in float32"
        note = f"[train] compute_dtype = {train['compute_dtype']!r} runs in {compute} here ({why}, {device.name})"
    quantization = None
    if train["method"] == "qlora":
        quantization = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": train["quant_type"],
            "bnb_4bit_use_double_quant": train["double_quant"],
            "bnb_4bit_compute_dtype": compute,
        }
        if fsdp:
            # FSDP shards floating-point tensors only, and wraps a layer's tensors together when
            # they share a dtype: the 4-bit weights are stored in the dtype of the rest.
            quantization["bnb_4bit_quant_storage"] = weights
    device_map = None if processes > 1 else ("cuda" if device.cuda else "cpu")
    return Precision(compute, weights, quantization, device_map, note)


def vllm_dtype(train: dict[str, Any], device: Device) -> str:
    """vLLM's --dtype for a model trained with `train`: the policy's compute dtype. vLLM loads
    the base in it, never in 4-bit (it has no bitsandbytes method): a QLoRA adapter is served on
    the full-precision base it was quantised from."""
    return compute_dtype(train["compute_dtype"], device)


@contextlib.contextmanager
def trainable_4bit(precision: Precision) -> Iterator[None]:
    """Around training a QLoRA base on the CPU. bitsandbytes 0.50.2, on CPUs with AVX512-BF16,
    repacks a 4-bit layer for its fast inference kernel the first time the layer runs without
    gradients (the Trainer's evaluation every eval_steps), and that kernel has no backward: from
    then on the LoRA weights below get wrong gradients, silently. Layers made inside this block
    keep the plain kernel; the evaluation and the chat, which load their own, keep the fast one."""
    if precision.quantization is None or precision.device_map == "cuda":
        yield
        return
    import bitsandbytes.nn.modules as modules

    saved = modules.has_avx512bf16
    modules.has_avx512bf16 = lambda: False
    try:
        yield
    finally:
        modules.has_avx512bf16 = saved
