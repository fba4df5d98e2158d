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

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU)" >&2
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
if ! .venv/bin/python -c "import rankdown, pytest, hypothesis, matplotlib" 2>/dev/null; then
  echo "setup: installing rankdown and its test tools" >&2
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
fi
