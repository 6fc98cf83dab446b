#!/usr/bin/env bash
# Fetch the installed timm's own tests (its source distribution on the package registry ships
# tests/test_models.py) into .cache/timm-tests/timm-<version>/, for tests/test_timm_model_suite.py.
# Never copied into the project; a second run finds them and does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python -c "import timm; print(timm.__version__)")
dest=.cache/timm-tests
[ -f "$dest/timm-$version/tests/test_models.py" ] && exit 0
mkdir -p "$dest"
pip download --quiet --no-binary :all: --no-deps "timm==$version" -d "$dest"
tar xzf "$dest/timm-$version.tar.gz" -C "$dest" "timm-$version/tests"
echo "timm $version tests in $dest/timm-$version/tests"
