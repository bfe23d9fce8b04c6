#!/usr/bin/env bash
# The Azure ML job's command (`python infra/remote.py finetune --target azureml`), run by every
# process of it. Azure ML is the launcher, as torchrun would be: it starts process_count_per_instance
# processes on each of instance_count nodes and sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and
# LOCAL_RANK, which accelerate (inside TRL's trainer) reads. So the script runs under plain python:
# torchrun or `accelerate launch` here would start G x G processes per node.
# The packages are in the job's image (tuner/cloud/azureml.py builds it from setup/requirements-*cuda.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HOME=${HF_HOME:-$PWD/.cache/huggingface} PYTHONUNBUFFERED=1
# The workspace's own code (tuner/), which the scripts import, as it was uploaded.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# One process per node gets the base model; the others on that node wait for it. The marks live
# in .cache/, which an upload never sends, so a stale one cannot arrive with the code.
mkdir -p .cache
if [ "${LOCAL_RANK:-0}" = 0 ]; then
  python setup/download_model.py || { touch .cache/model-failed; exit 1; }
  touch .cache/model-ready
fi
until [ -e .cache/model-ready ]; do
  if [ -e .cache/model-failed ]; then exit 1; fi
  sleep 5
done

python finetuning/train_sft.py --settings settings.toml

# Azure ML keeps what is under outputs/ with the job (`az ml job download -n NAME --all`).
if [ "${RANK:-0}" = 0 ]; then
  mkdir -p outputs
  cp -r "$ADAPTER_PATH" outputs/adapter
fi
