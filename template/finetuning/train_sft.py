"""Fine-tune on several GPUs, or several machines, with TRL's SFTTrainer and write the adapter.

    python finetuning/train_sft.py                              # one process: one GPU, or the CPU
    torchrun --nproc_per_node 4 finetuning/train_sft.py         # 4 GPUs of this machine (DDP)
    torchrun --nproc_per_node 4 finetuning/train_sft.py --fsdp  # a model too big for one GPU (FSDP)
    accelerate launch --num_processes 4 finetuning/train_sft.py  # DDP, or FSDP with --use_fsdp
    python infra/remote.py finetune --target azureml --nodes 2 --gpus-per-node 8  # several machines

invoke_olive.py is the single-GPU default. This is the same run on more GPUs: the same settings
([train] of settings.toml, --set, --settings), the same rows, split and tokenised examples with
the loss on the answers only (tuner.data), the same adapter in models/adapter (with run.json,
log_history.json and eval.json) and the same held-out evaluation. Every process trains on its
own share of each batch: one optimizer step sees per_device_train_batch_size x
gradient_accumulation_steps x the number of processes examples, so divide the batch size by the
number of GPUs to keep a step what it was on one. An interrupted run resumes from its last
checkpoint when started again with the same settings, data and code (--fresh starts over).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

import tuner.data
from tuner.data import DatasetError, split_rows, tokenize
from tuner.evaluation import evaluate
from tuner.runs import (
    RunError,
    check_run,
    fingerprint,
    last_complete_checkpoint,
    publish_run,
    recover_adapter,
    take_lock,
)
from tuner.settings import (
    CHECKPOINTS,
    MODELS,
    RUNS,
    SettingsError,
    adapter_dir,
    add_settings_arguments,
    in_workspace,
    settings_for_script,
)

ROOT = Path(__file__).resolve().parents[1]


def fail(message: str, code: int = 1) -> NoReturn:
    if os.environ.get("LOCAL_RANK", "0") == "0":  # every process fails alike: say it once per machine
        print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_arguments(parser, ROOT, "train.num_train_epochs=2")
    parser.add_argument("--fsdp", action="store_true", help="shard the model over the GPUs (FSDP) instead of DDP")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier checkpoints and start over")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation, base vs fine-tuned")
    args = parser.parse_args()
    settings = settings_for_script(args.settings, args.overrides)
    train = settings["train"]
    # Set for each process by torchrun, `accelerate launch` and Azure ML; absent for a plain run.
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    # 1. Check everything cheap, in every process, before loading anything heavy or writing anything.
    try:
        rows, warning = check_run(settings, ROOT)
    except (SettingsError, RunError) as err:
        fail(str(err))
    except DatasetError as err:
        fail(str(err), code=2)
    if warning and rank == 0:
        print(warning, file=sys.stderr)
    train_rows, eval_rows = split_rows(rows, train["eval_split"], train["data_seed"])
    model_path = in_workspace(ROOT, settings["model"]["path"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    import torch

    has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
    if train["method"] == "qlora" and not (has_bitsandbytes and torch.cuda.is_available()):
        fail(
            f"QLoRA needs bitsandbytes and a CUDA GPU (bitsandbytes installed: {has_bitsandbytes}, GPUs torch "
            f"sees: {torch.cuda.device_count()}): train plain LoRA with --set train.method=lora "
            "--set train.compute_dtype=float32"
        )

    # 2. One run at a time per workspace. Only the first process takes the lock and publishes: on a
    # filesystem shared by all machines that is one lock, and where each machine has its own copy
    # (Azure ML) the others only train. A lock held elsewhere ends rank 0, and the launcher the rest.
    adapter = adapter_dir(ROOT)
    staging = adapter.with_name(adapter.name + ".tmp")
    if rank == 0:
        try:
            take_lock(ROOT / MODELS / ".finetune.lock")
        except RunError as err:
            fail(str(err))
        recover_adapter(adapter, ROOT)
        shutil.rmtree(staging, ignore_errors=True)
    fp = fingerprint(settings, ROOT, [Path(tuner.data.__file__), Path(__file__)])
    checkpoints = in_workspace(ROOT, CHECKPOINTS) / fp
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(in_workspace(ROOT, RUNS) / fp))
    if settings["model"]["id"] == "tiny-random":
        torch.set_num_threads(1)  # tiny matrices: threads cost more than they save

    # 3. The examples, tokenised as invoke_olive.py's are: input_ids, attention_mask, and labels that
    # are -100 outside the answers. TRL takes them as they are (skip_prepare_dataset: no chat
    # template, no truncation, no packing) and its collator pads with -100 and keeps the labels.
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    try:
        train_set = Dataset.from_list(tokenize(tokenizer, train_rows, settings))
        eval_set = Dataset.from_list(tokenize(tokenizer, eval_rows, settings)) if eval_rows else None
    except DatasetError as err:
        fail(str(err), code=2)

    # FSDP shards parameters, gradients and optimizer state over the GPUs: for a model whose
    # weights do not fit one GPU. Asked for with --fsdp, or by `accelerate launch --use_fsdp`.
    fsdp = args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    # float16 weights train unstably: keep them in float32 and compute in float16 (as Olive does).
    dtype = {"float16": "float32"}.get(train["compute_dtype"], train["compute_dtype"])
    quantization = None
    if train["method"] == "qlora":
        # 4-bit weights stored as bfloat16 so that FSDP, which shards only floating-point tensors,
        # can shard them; under FSDP the rest of the model in the same dtype, so that it is
        # wrapped together with them.
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=train["quant_type"],
            bnb_4bit_use_double_quant=train["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, train["compute_dtype"]),
            bnb_4bit_quant_storage=torch.bfloat16,
        )
        dtype = "bfloat16" if fsdp else dtype
    # PyTorch's fused attention: the same results as "eager", faster and leaner.
    model_init: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if world_size > 1:  # each process loads the model whole onto its own GPU (never device_map="auto")
        model_init["device_map"] = None
    # cpu_ram_efficient_loading: the first process reads the weights and sends them to the others,
    # instead of one copy per GPU in RAM. transformers also wraps the LoRA layers on their own.
    # Not DeepSpeed ZeRO-3: it cannot partition bitsandbytes' 4-bit weights, and QLoRA under ZeRO-3
    # breaks in loading, saving and gradient checkpointing (issues in trl, peft and DeepSpeed).
    sharding: dict[str, Any] = {}
    if args.fsdp:
        options: dict[str, Any] = {"cpu_ram_efficient_loading": True}
        if train["method"] == "qlora":
            # FSDP2 (the default) gathers bitsandbytes' 4-bit weights as plain tensors, without what
            # dequantises them: QLoRA takes FSDP1, where use_orig_params lets one wrapped layer hold
            # the frozen 4-bit weights and the trainable LoRA weights (bitsandbytes' FSDP-QLoRA).
            options |= {"version": 1, "use_orig_params": True}
        sharding = {"fsdp": True, "fsdp_config": options}
    has_eval = eval_set is not None
    config = SFTConfig(
        output_dir=str(checkpoints),
        model_init_kwargs=model_init,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # tuner.data already cut every example to max_seq_len
        packing=False,
        seed=train["seed"],  # the LoRA initialisation and dropout
        data_seed=train["data_seed"],  # the order of the examples: the same sampler in every process
        per_device_train_batch_size=train["per_device_train_batch_size"],
        per_device_eval_batch_size=train["per_device_eval_batch_size"],
        gradient_accumulation_steps=train["gradient_accumulation_steps"],
        activation_checkpointing=train["gradient_checkpointing"],
        learning_rate=train["learning_rate"],
        lr_scheduler_type=train["lr_scheduler_type"],
        num_train_epochs=train["num_train_epochs"],
        max_steps=train["max_steps"],
        bf16=train["compute_dtype"] == "bfloat16",
        fp16=train["compute_dtype"] == "float16",
        # The loss is the mean over the answer tokens of all processes, as on one GPU with the
        # whole batch (not a mean of per-process means, which weighs short answers more).
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient: skip the search
        logging_steps=train["logging_steps"],
        eval_strategy="steps" if has_eval else "no",
        eval_steps=train["eval_steps"],
        save_strategy="steps",
        save_steps=train["save_steps"],
        save_total_limit=2,
        dataloader_num_workers=0,
        # Without a GPU, several processes train on the CPU over gloo (how the tests check DDP).
        use_cpu=not torch.cuda.is_available(),
        report_to=train["report_to"],
        **sharding,
    )
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()  # the process group, set up by SFTConfig
    with state.main_process_first():  # the first process moves torn checkpoints aside before the rest look
        if args.fresh and state.is_main_process:
            shutil.rmtree(checkpoints, ignore_errors=True)
        last = last_complete_checkpoint(checkpoints, ROOT)
    if len(set(gather_object([last and last.name]))) > 1:  # machines that do not share the folder
        last = None
    if rank == 0:
        start = f"Resuming from {last.name}" if last else f"Fine-tuning {settings['model']['id']} on {len(rows)} rows"
        print(f"{start} (run {fp}, {world_size} process{'es' if world_size > 1 else ''})", flush=True)

    # 4. Train. The Trainer prints progress and the loss as it goes.
    peft_config = LoraConfig(
        r=train["lora_r"],
        lora_alpha=train["lora_alpha"],
        lora_dropout=train["lora_dropout"],
        target_modules=train["target_modules"],
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=str(model_path),
        args=config,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization,
    )
    try:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    except KeyboardInterrupt:
        fail("interrupted: run the same command again to resume from the last checkpoint", code=130)
    # Every process takes part in gathering the weights (FSDP holds a shard of them in each).
    weights = trainer.accelerator.get_state_dict(trainer.model)
    # Then every process leaves the process group together, and only the first goes on. A process
    # that exits while the group is still open can abort in the backend's threads at exit
    # ("terminate called without an active exception"), failing the run after it has finished.
    state.wait_for_everyone()
    state.destroy_process_group()
    if rank != 0:
        return
    # Only the adapter, as Olive writes it (the Trainer's own save adds the tokenizer and its arguments).
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(staging, state_dict=weights)

    # 5. Publish the adapter, with the record of what ran: a half-written adapter never looks finished.
    record = {"run": fp, "script": "train_sft.py", "processes": world_size, "fsdp": fsdp, "settings": settings}
    summary = publish_run(staging, adapter, record, trainer.state.log_history)
    print(f"Adapter written to {adapter.relative_to(ROOT)}{summary}", flush=True)

    # 6. Score base vs fine-tuned on the rows held out of training (writes adapter/eval.json).
    if not args.no_eval:
        del trainer, weights  # free the training model's memory first
        evaluate(adapter, settings, ROOT)


if __name__ == "__main__":
    main()
