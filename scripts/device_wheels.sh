#!/usr/bin/env bash
# Stage lm-eval and gguf for a lent GPU machine, which has no package index: the wheels its image
# lacks for `qkvlab eval harness` (lm-eval and the part of its dependencies that the harness path
# imports and the image does not have: datasets, dill, multiprocess, xxhash, zstandard) and for
# `qkvlab import` of a GGUF file (gguf; the image has none, found 2026-12-06), for CPython 3.12 on
# x86-64 Linux, into the git-ignored .data/wheels/ (16 MB; the image's torch, numpy, pandas, pyarrow,
# fsspec, huggingface_hub and requests are used as they are). The versions are the ones that ran
# there (2026-12-05, torch 2.11 image). Carry .data/wheels, then on the machine:
#   python3 -m pip install -q --no-deps --no-index .data/wheels/*.whl
# (`pip` alone can belong to another interpreter there.)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.data/wheels
rm -rf "$dest" && mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dest" lm-eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 zstandard==0.25.0 gguf==0.19.0
du -sh "$dest"
