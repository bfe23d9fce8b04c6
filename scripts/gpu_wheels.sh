#!/usr/bin/env bash
# Fill .whl/ with the Python 3.12 x86-64 wheels that bench/gpu_check.sh needs and the GPU machine
# lacks (it has no network; its package list is /work/.library/device/KINDS.md): run it here,
# then name .whl in the device tool's carry. .whl/ is git-ignored through .git/info/exclude.
# The wheels and the working tree travel together, 64 MiB at most: this fails when they would not.
#
# bitsandbytes' wheel (43 MB) holds a library for every CUDA, ROCm and XPU version: the copy in
# .whl/ keeps the CPU and CUDA 13.x ones (the machine's torch is built for CUDA 13.0), 8 MB.
# transformers is carried although the machine has one: its 5.17 lacks what the workspace's
# train_sft.py passes to SFTConfig (activation_checkpointing: a TypeError, seen in the CPU plumbing
# run under 5.17), so the workspace's pin, 5.23, travels (13 MB).
# Not carried: torch, accelerate, tokenizers, huggingface-hub, safetensors, matplotlib, tensorboard
# (the machine's versions satisfy transformers 5.23 and the rest; the table prints what ran).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=56   # the wheels
TRAVEL_MIB=63  # the wheels and the tree: the device tool's 64 MiB, less a margin

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >>"$exclude"

# includes/versions.yml's pins: `common` entries are indented two spaces, bitsandbytes is top-level.
pin() { sed -n "s/^$1: \"\(.*\)\"$/\1/p" includes/versions.yml; }
wanted=(
  "bitsandbytes==$(pin bitsandbytes)"
  "transformers==$(pin '  transformers')" "olive-ai==$(pin '  olive-ai')" "trl==$(pin '  trl')"
  "peft==$(pin '  peft')" "datasets==$(pin '  datasets')"
  # copier renders the workspace there (requirements-dev.txt's pin) and its own needs.
  "$(grep '^copier==' requirements-dev.txt)"
  # What those import that the machine lacks: the versions of the template's test environment.
  dill==0.4.1 multiprocess==0.70.19                                   # datasets
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5  # olive, copier
  typing-extensions==4.16.0                                           # pydantic-core needs >= 4.16
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2  # olive
  optuna==5.1.0 colorlog==6.12.0                                      # olive (optuna's database unused)
  questionary==2.1.1 prompt-toolkit==3.0.53 wcwidth==0.9.5            # olive, copier
  dunamai==1.26.5 funcy==2.1 jinja2-ansible-filters==1.3.2 plumbum==2.0.2 platformdirs==4.14.9  # copier
)
for spec in "${wanted[@]}"; do
  [[ $spec == *==?* ]] || { echo "error: no version for '$spec' (includes/versions.yml changed?)" >&2; exit 1; }
done

# One version of each package: the install there refuses two. Start from an empty folder.
rm -rf "$DEST"
platforms=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
  manylinux_2_17 manylinux2014 manylinux1; do platforms+=(--platform "${p}_x86_64"); done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$DEST" "${wanted[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)  # a local pip config's missing mirrors

"$PY" scripts/slim_wheel.py "$DEST"/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_(cuda1[0-2][0-9]|rocm[0-9]+|xpu[0-9]+)\.so'

count=$(find "$DEST" -type f -name '*.whl' | wc -l)
bytes=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "$DEST: $count wheels, $(mib "$bytes") MiB"
if ((count != ${#wanted[@]})); then
  echo "error: ${#wanted[@]} packages asked for, $count wheels in $DEST" >&2
  exit 1
fi
if ((bytes > LIMIT_MIB * 1048576)); then
  echo "error: $DEST holds $(mib "$bytes") MiB, over $LIMIT_MIB: the rest of the tree must fit beside it" >&2
  exit 1
fi
# What travels beside the wheels: tracked files and untracked ones that git does not ignore.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -n 1 | cut -f1)
echo "with the working tree ($(mib "$tree") MiB): $(mib $((bytes + tree))) MiB of the $TRAVEL_MIB MiB that may travel"
if ((bytes + tree > TRAVEL_MIB * 1048576)); then
  echo "error: $(mib $((bytes + tree))) MiB would travel, over $TRAVEL_MIB: carry fewer wheels or make the tree smaller" >&2
  exit 1
fi
