#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels that tools/gpu_check.sh installs on a GPU
# machine that has Python 3.12, torch and triton but no index: megatron-core, numpy, packaging,
# pytest and its own dependencies, and setuptools (torch imports it), at the versions of this
# checkout's .venv, into .gpu-wheels/ (an ignored folder, about 20 MB: carry it with the tree).
#
#   bash tools/gpu_wheels.sh                    # x86_64 Linux wheels (an HGX H100/H200 host)
#   PLATFORM=aarch64 bash tools/gpu_wheels.sh   # a Grace Hopper host
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-.venv/bin/python}"
DEST="${DEST:-.gpu-wheels}"
PLATFORM="${PLATFORM:-x86_64}"

version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
pins=()
for name in megatron-core numpy packaging pytest pluggy iniconfig pygments setuptools; do
    pins+=("$name==$(version "$name")")
done
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
    platforms+=(--platform "${tag}_${PLATFORM}")
done

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --disable-pip-version-check --quiet --dest "$DEST" --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${platforms[@]}" --platform any "${pins[@]}"
ls -1 "$DEST"
du -sh "$DEST"
