#!/usr/bin/env bash
# The test suite under the oldest torch the package supports (2.6.0) with the oldest Triton it
# supports (3.6.0), on this machine's CPU, in a virtual environment of their own:
#
#   bash scripts/check_oldest_torch.sh [pytest args ...]      ($VENV defaults to /tmp/vit_kernels_torch26)
#
# torch 2.6 pins Triton 3.2, so Triton 3.6 is installed over it without dependencies: pip will
# not resolve the pair by itself, and torch 2.6's Inductor cannot import Triton 3.6, so the
# tests marked `inductor` (torch.compile, opcheck) skip with that reason. NumPy is the newest:
# Triton 3.6's interpreter needs vit_kernels._dispatch's mend to run beside NumPy 2.4. The
# extension builds for the CPU alone when the local nvcc's CUDA major differs from the wheel's
# (12). Not part of CI: it downloads about 3 GB and runs the suite once more.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/vit_kernels_torch26}
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.6.0 torchvision==0.21.0 numpy pytest pytest-benchmark ninja \
        pybind11 safetensors tqdm timm transformers scikit-learn Pillow matplotlib
    "$VENV/bin/pip" install -q --no-deps --force-reinstall triton==3.6.0
fi
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# The tree itself on the path (not installed), and an extension cache of this torch's own.
VIT_KERNELS_CACHE=${VIT_KERNELS_CACHE:-$VENV/vit_kernels_cache} PYTHONPATH=$PWD \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs "$@"
