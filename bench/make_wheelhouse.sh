#!/usr/bin/env bash
# Fills bench/wheelhouse/ with the wheels of requirements.txt for another machine's Python, so
# bench/gpu_suite.sh can install what that machine lacks without the network.
#
#   bench/make_wheelhouse.sh 3.11      # the target's Python version (default: this one's)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
mkdir -p bench/wheelhouse
python -m pip download -q --only-binary=:all: --python-version "$VERSION" --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  -d bench/wheelhouse -r requirements.txt
echo "wrote $(ls bench/wheelhouse | wc -l) wheels for Python $VERSION to bench/wheelhouse" >&2
