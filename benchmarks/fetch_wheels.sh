#!/usr/bin/env bash
# Download the benchmark peers (TRL, Liger-Kernel, Cut Cross-Entropy) and the few dependencies the GPU image
# lacks, as Python 3.12 x86-64 wheels, into .whl/ (git-ignored). benchmarks/gpu_check.sh installs them there with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Run this on a machine that reaches PyPI, from the repository root, before lending the tree to a GPU machine.
#
# Why these and no more: the GPU image already holds torch 2.11, triton 3.6, transformers, accelerate, numpy,
# pandas, pyarrow, xxhash, fsspec, huggingface-hub, requests, tqdm, filelock, packaging, psutil, pyyaml, rich.
# `import trl` pulls in `datasets` (trl.trainer.utils imports it), and `datasets` needs `dill` and `multiprocess`;
# fastalign's own trainer reads data through `datasets` too. Liger-Kernel and CCE need only torch + triton.
# Everything is pinned to the peer versions the GPU targets in docs/architecture.md (*Targets*) are measured
# against. Total: well under 40 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
PINS=(
  trl==1.16.0
  liger-kernel==0.8.5
  cut-cross-entropy==25.1.1
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
)
for pin in "${PINS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$pin"
done
# one version of each package, or the --no-index install on the GPU machine refuses the whole set
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | sed 's/-[0-9].*//' | sort | uniq -d)
if [[ -n "$dups" ]]; then echo "fetch_wheels: several versions of: $dups — remove the extra ones" >&2; exit 1; fi
du -ch "$DEST"/*.whl | tail -1
ls -1 "$DEST"
