#!/usr/bin/env bash
# Recreates .venv-torch (git-ignored) with the pinned PyTorch/transformers stack from
# tools/requirements-torch.txt. Usage: bash tools/setup_torch.sh   then   . .venv-torch/bin/activate
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TORCH_VENV:-$repo_root/.venv-torch}"
python3 -m venv "$venv"
"$venv/bin/pip" install --upgrade pip >/dev/null
# torch pulls its nvidia-* CUDA wheels from PyPI: needed for `import torch` even on a CPU-only host.
"$venv/bin/pip" install -r "$repo_root/tools/requirements-torch.txt"
"$venv/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
