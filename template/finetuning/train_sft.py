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

import os
import shutil
from pathlib import Path
from typing import Any

import tuner.data
from tuner.data import tokenize
from tuner.settings import Interrupted, in_workspace, run_script, script_parser, settings_for_script
from tuner.training.evaluation import evaluate
from tuner.training.precision import trainable_4bit
from tuner.training.runs import (
    RunError,
    already_trained,
    last_complete_checkpoint,
    lora_targets,
    publish_run,
    start_over_reason,
    start_run,
    training_arguments,
)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = script_parser(__doc__, ROOT, "train.num_train_epochs=2")
    parser.add_argument("--fsdp", action="store_true", help="shard the model over the GPUs (FSDP) instead of DDP")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier checkpoints and start over")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation, base vs fine-tuned")
    args = parser.parse_args()
    settings = settings_for_script(args.settings, args.overrides)
    train = settings["train"]
    # Set for each process by torchrun, `accelerate launch` and Azure ML; absent for a plain run.
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # FSDP shards parameters, gradients and optimizer state over the GPUs: for a model whose
    # weights do not fit one GPU. Asked for with --fsdp, or by `accelerate launch --use_fsdp`: the
    # same FSDP options either way (set below).
    fsdp = args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if fsdp and world_size == 1:  # transformers fails deep in setup without a process group
        raise RunError(
            "FSDP shards the model over several processes: launch with torchrun --nproc_per_node N ... --fsdp"
        )

    # 1. Check everything cheap, in every process, before loading anything heavy or writing
    # anything; the first process takes the workspace's lock. Only it publishes: on a filesystem
    # shared by all machines that is one lock, and where each machine has its own copy (Azure ML)
    # the others only train. A lock held elsewhere ends rank 0, and the launcher the rest. Every
    # process fails alike; run_script says it once per machine (a bad dataset: exit code 2).
    run = start_run(settings, ROOT, [Path(tuner.data.__file__), Path(__file__)], rank, world_size, fsdp)
    if not args.fresh and already_trained(run):  # every process sees it: all stop here
        if rank == 0:
            adapter = run.adapter.relative_to(ROOT)
            print(f"already trained (run {run.fp}): {adapter} is its result; --fresh to train again")
        return
    if rank == 0:
        shutil.rmtree(run.staging, ignore_errors=True)
    model_path = in_workspace(ROOT, settings["model"]["path"])
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and newer; ignored before
    if settings["model"]["threads"]:  # 1 for tiny matrices: threads cost more than they save
        torch.set_num_threads(settings["model"]["threads"])

    # 2. The examples, tokenised as invoke_olive.py's are: input_ids, attention_mask, and labels that
    # are -100 outside the answers. TRL takes them as they are (skip_prepare_dataset: no chat
    # template, no truncation, no packing) and its collator pads with -100 and keeps the labels.
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    train_set = Dataset.from_list(tokenize(tokenizer, run.train_rows, settings))
    eval_set = Dataset.from_list(tokenize(tokenizer, run.eval_rows, settings)) if run.eval_rows else None

    # The precision policy (tuner.training.precision): the weights' dtype, the 4-bit config of a QLoRA base
    # (under FSDP stored in the weights' dtype, so that FSDP can shard it with the rest), and no
    # device_map when a launcher runs several processes (each loads the model whole onto its GPU).
    precision = run.precision
    model_init: dict[str, Any] = {
        "dtype": precision.weights_dtype,
        "device_map": precision.device_map,
        "attn_implementation": "sdpa",  # PyTorch's fused attention: as "eager", faster and leaner
    }
    sharding: dict[str, Any] = {}
    if fsdp:
        # cpu_ram_efficient_loading: the first process reads the weights and sends them to the
        # others, instead of one copy per GPU in RAM. transformers honours it only when
        # ACCELERATE_USE_FSDP is set before the model loads, which torchrun does not do.
        # Not DeepSpeed ZeRO-3: it cannot partition bitsandbytes' 4-bit weights, and QLoRA under
        # ZeRO-3 breaks in loading, saving and gradient checkpointing (issues in trl, peft, DeepSpeed).
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        options: dict[str, Any] = {"cpu_ram_efficient_loading": True}
        if train["method"] == "qlora":
            # FSDP2 (the default) gathers bitsandbytes' 4-bit weights as plain tensors, without what
            # dequantises them: QLoRA takes FSDP1, where use_orig_params lets one wrapped layer hold
            # the frozen 4-bit weights and the trainable LoRA weights (bitsandbytes' FSDP-QLoRA).
            options |= {"version": 1, "use_orig_params": True}
        sharding = {"fsdp": True, "fsdp_config": options}
    trainer_args = training_arguments(settings, precision, run.checkpoints)
    # transformers 5 names it activation_checkpointing (gradient_checkpointing is its old alias, the
    # name Olive's own field keeps).
    trainer_args["activation_checkpointing"] = trainer_args.pop("gradient_checkpointing")
    config = SFTConfig(
        **trainer_args,
        model_init_kwargs=model_init,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # tuner.data already cut every example to max_seq_len
        packing=False,
        # The loss is the mean over the answer tokens of all processes, as on one GPU with the
        # whole batch (not a mean of per-process means, which weighs short answers more).
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient: skip the search
        # Without a GPU, several processes train on the CPU over gloo (how the tests check DDP).
        use_cpu=not torch.cuda.is_available(),
        **sharding,
    )
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()  # the process group, set up by SFTConfig
    with state.main_process_first():  # the first process moves torn checkpoints aside before the rest look
        reason = start_over_reason(run, ROOT, args.fresh) if state.is_main_process else ""
        if reason:
            if not args.fresh:
                print(f"{reason}: training it again from the start", flush=True)
            shutil.rmtree(run.checkpoints, ignore_errors=True)
        last = last_complete_checkpoint(run.checkpoints, ROOT)
    if len(set(gather_object([last and last.name]))) > 1:  # machines that do not share the folder
        last = None
    if rank == 0:
        start = (
            f"Resuming from {last.name}" if last else f"Fine-tuning {settings['model']['id']} on {len(run.rows)} rows"
        )
        print(f"{start} (run {run.fp}, {world_size} process{'es' if world_size > 1 else ''})", flush=True)

    # 3. Train, showing one progress bar (steps, loss, elapsed, time left).
    from tuner.training.progress import trainer_progress

    peft_config = LoraConfig(
        r=train["lora_r"],
        lora_alpha=train["lora_alpha"],
        lora_dropout=train["lora_dropout"],
        target_modules=lora_targets(train),
        task_type="CAUSAL_LM",
    )
    # The LoRA weights are made before the Trainer seeds itself: seed first with the training seed,
    # as invoke_olive.py does, so that the seed decides them (data_seed only splits and shuffles).
    torch.manual_seed(train["seed"])
    with trainable_4bit(precision), trainer_progress():
        trainer = SFTTrainer(
            model=str(model_path),
            args=config,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            peft_config=peft_config,
            quantization_config=precision.bnb_config(),
        )
    if precision.quantization is not None:
        # TRL casts a QLoRA adapter to bfloat16 (the QLoRA paper's choice), even on a CPU or a T4
        # that computes in float32 or float16. peft, and so Olive, keep LoRA weights in float32:
        # back to float32 before the optimizer is made, so that both trainers train the same adapter.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    try:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: run the same command again to resume from the last checkpoint") from None
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
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(run.staging, state_dict=weights)

    # 4. Publish the adapter, with the record of what ran: a half-written adapter never looks finished.
    record = {"run": run.fp, "script": "train_sft.py", "processes": world_size, "fsdp": fsdp, "settings": settings}
    summary = publish_run(run.staging, run.adapter, record, trainer.state.log_history)
    print(f"Adapter written to {run.adapter.relative_to(ROOT)}{summary}", flush=True)

    # 5. Score base vs fine-tuned on the rows held out of training (writes adapter/eval.json).
    if not args.no_eval:
        del trainer, weights  # free the training model's memory first
        evaluate(run.adapter, settings, ROOT)


if __name__ == "__main__":
    run_script(main)
