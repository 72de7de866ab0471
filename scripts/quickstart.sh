#!/usr/bin/env bash
# Fresh machine -> installed `mtl` -> Omniglot prepared -> all three MTL phases (measured on 2 cores:
# 3.4 min with AVX512-BF16, 19 min on an AVX2-only CPU, which computes in fp32).
# Data: ../shared/data/omniglot if it is there, else the canonical archives (--download, md5-checked).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0          # the CPU wheel; on a GPU machine: pip install torch
.venv/bin/pip install -q -e ".[all,test]"   # test: the README's second command runs pytest
if [ -d ../shared/data/omniglot ]; then
  .venv/bin/mtl data prepare omniglot --rotations --source ../shared/data/omniglot --root data
else
  .venv/bin/mtl data prepare omniglot --rotations --download --root data
fi
.venv/bin/mtl run --preset omniglot-cpu --data-root data --out runs/omniglot-cpu "$@"
