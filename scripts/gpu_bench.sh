#!/usr/bin/env bash
# One device call: `imagegen bench gpu` (serve/cli/bench_gpu.py) under a time budget.
#
#   scripts/gpu_bench.sh            # the full run: SDXL-arch plain vs fast path, then
#                                   # SDXL-arch and SD1.5-arch profiles, then the stack
#   scripts/gpu_bench.sh --smoke    # the same code at 64x64 on tiny stand-ins (~1 min)
#   BUDGET_S=300 scripts/gpu_bench.sh --compile reduce-overhead
#
# Results land in $OUT (the device tool's folder) or ./gpu-bench-out: gpu-bench.jsonl
# (one JSON line per result, written as each finishes: a run cut short keeps what it
# measured), gpu-profiles.toml (for `imagegen capacity plan --profiles`) and the log.
# BUDGET_S (default 510) leaves a 10-minute call room for the wheels, the imports and
# the kill margin below; steps that would not fit are written as skipped.
#
# The device has torch but not this project's other needs. Before the call, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 pydantic==2.14.4 \
#     pydantic_core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 tomlkit==0.15.2
# (check `python3 -m pip show huggingface_hub transformers` there first: diffusers
# 0.42 may want a newer huggingface_hub than the device's), then run with carry [".whl"]:
#   scripts/gpu_bench.sh            (timeout_s 600)
# This script installs .whl/*.whl into /tmp/site when the folder is there.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-gpu-bench-out}
BUDGET_S=${BUDGET_S:-510}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}

{
  date -u +"start %FT%TZ"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || echo "no nvidia-smi"
  "$PY" -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers",
    diffusers.__version__, "cuda", torch.cuda.is_available())'
} 2>&1 | tee "$OUT_DIR/gpu-bench.log"

# SIGINT first (the JSON lines are flushed per result), then a kill 20 s later.
set +e
timeout --signal=INT --kill-after=20 "$((${BUDGET_S%.*} + 45))" \
  "$PY" -m serve.cli.bench_gpu --budget-s "$BUDGET_S" \
    --out "$OUT_DIR/gpu-bench.jsonl" --profiles-out "$OUT_DIR/gpu-profiles.toml" "$@" \
  2>&1 | grep -v -e '^DEBUG' | tee -a "$OUT_DIR/gpu-bench.log"
rc=${PIPESTATUS[0]}
echo "exit $rc; results in $OUT_DIR" | tee -a "$OUT_DIR/gpu-bench.log"
exit "$rc"
