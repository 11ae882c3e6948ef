#!/usr/bin/env bash
# setup.sh [VENV]: create the peers venv (default .peers-venv at the repo root) with
# LitServe and BentoML beside the same torch/diffusers/transformers as constraints.txt.
# Run it before entering scripts/loopback: the namespace has no network.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:-$root/.peers-venv}"
python="${PYTHON:-python3}"

[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
# torch first, from the CPU index and exact: otherwise the resolver may pick a CUDA
# build (15 nvidia packages) to satisfy a peer's loose torch requirement.
torch_pin="$(grep -E '^torch==' "$here/requirements.txt")"
# The local version label makes it exact: only the CPU build satisfies it. pip's own
# configuration (a wheel on this machine, a mirror) is tried first, then the CPU index.
torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
"${pip[@]}" "$torch_pin+cpu" 2>/dev/null \
  || "${pip[@]}" "$torch_pin+cpu" --extra-index-url "$torch_index"
# The pins are constraints too, so nothing a peer depends on can move torch.
"${pip[@]}" -r "$here/requirements.txt" -c "$here/requirements.txt"
if "$venv/bin/python" -m pip show torchvision >/dev/null 2>&1; then
  echo "torchvision got installed in $venv: it breaks the CPU torch; remove it" >&2
  exit 1
fi
"$venv/bin/python" -c 'import torch, diffusers, transformers, litserve, bentoml
print("peers venv ready:", "torch", torch.__version__, "diffusers", diffusers.__version__,
      "transformers", transformers.__version__, "litserve", litserve.__version__,
      "bentoml", bentoml.__version__)'
"$venv/bin/python" -m pip freeze > "$venv/freeze.txt"
