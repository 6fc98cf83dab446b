#!/usr/bin/env bash
# swap_modules under transformers 4.x's CLIP/SigLIP layout (tests/test_swap_transformers4.py),
# on this machine's CPU: 4.46 (one attention class per implementation, CLIPSdpaAttention, ...)
# and 4.57 (CLIP's old call form on the attention registry), each installed with the tokenizers
# and huggingface_hub it accepts into a directory of its own ($TRANSFORMERS4_DIR, default
# .cache/transformers4) that is put first on the path, beside the project's own transformers 5:
#
#   bash scripts/check_transformers4.sh [pytest args ...]
#
# Part of CI (about a minute: two downloads of a few MB, 12 tests per version).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${TRANSFORMERS4_DIR:-.cache/transformers4}
for pins in "4.46.3 tokenizers<0.21" "4.57.1 tokenizers==0.22.1"; do
    read -r version tokenizers <<<"$pins"
    dir="$ROOT/$version"
    if [ ! -f "$dir/transformers/__init__.py" ]; then
        pip install -q --no-deps --target "$dir" "transformers==$version" "$tokenizers" "huggingface_hub<1.0"
    fi
    echo "transformers $version"
    PYTHONPATH="$dir" python -m pytest -q -p no:cacheprovider tests/test_swap_transformers4.py "$@"
done
