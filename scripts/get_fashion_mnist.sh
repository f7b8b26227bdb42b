#!/usr/bin/env bash
# Make sure Debian's dataset-fashion-mnist IDX files are on this machine.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
  exit 0
fi
echo "Fashion-MNIST IDX files are missing from $dir; installing Debian package dataset-fashion-mnist"
sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then sudo_cmd="sudo"; fi
fi
if ! command -v apt-get >/dev/null || ! { $sudo_cmd apt-get update -qq && \
     $sudo_cmd apt-get install -y -qq dataset-fashion-mnist; }; then
  cat >&2 <<MSG
Could not install the Debian package dataset-fashion-mnist.
Either install it yourself (sudo apt-get install -y dataset-fashion-mnist), or place the four
IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,
t10k-labels-idx1-ubyte.gz) in a directory and run:
  .venv/bin/python -m pipeline prepare fashion-mnist --root THAT_DIRECTORY
MSG
  exit 1
fi
