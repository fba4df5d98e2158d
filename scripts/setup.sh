#!/usr/bin/env bash
# Set up rankdown from nothing: the Fashion-MNIST data package, a virtual environment in .venv,
# the CPU build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build), rankdown itself.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  echo "setup: installing the Debian package dataset-fashion-mnist" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# Latin fonts for the rendered character dataset (the `charnet` model; Jaderberg 2014's experiment).
FONTS="fonts-urw-base35 fonts-texgyre fonts-liberation2 fonts-freefont-ttf fonts-dejavu-extra fonts-croscore \
  fonts-lato fonts-open-sans fonts-cantarell fonts-go fonts-ebgaramond fonts-linuxlibertine fonts-comic-neue \
  fonts-bwht fonts-humor-sans fonts-dkg-handwriting fonts-breip fonts-femkeklaver fonts-rufscript fonts-noto-core"
if ! dpkg -s fonts-urw-base35 fonts-texgyre >/dev/null 2>&1; then
  echo "setup: installing Latin font packages (character dataset)" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $FONTS >/dev/null \
    || { $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
         $SUDO apt-get install -y -qq --no-install-recommends $FONTS >/dev/null; } \
    || echo "setup: font packages could not be installed; the character dataset falls back to the fonts present" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU)" >&2
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
if ! .venv/bin/python -c "import rankdown, pytest, hypothesis, matplotlib, mypy, transformers, gguf, onnxruntime, onnxscript" 2>/dev/null; then
  echo "setup: installing rankdown, its test tools and the hf and onnx extras" >&2
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev,hf,onnx]"
fi
