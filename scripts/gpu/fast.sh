#!/usr/bin/env bash
# The GPU fast path (CUDA graphs) on one GPU: the commands behind docs/benchmarks.md's GPU tables.
#   scripts/gpu/fast.sh setup   install carried wheels, join the staged GGUF pieces
#   scripts/gpu/fast.sh step    decode-step and tree-verification cost: eager vs CUDA graphs, kernel profile
#   VARIANTS= the forwards measured (step_cost.py --variants); COMPILE=1 compiles the bench's models
#   scripts/gpu/fast.sh bench   greedy bench on code and edit: ar, draft, pld, ngram vs hf-ar, hf-assisted, hf-pld
# Stage the GGUFs first (../shared/gpu/stage-file FILE NAME, names q15.gguf and q05.gguf) and run the
# calls back to back: an idle machine is given back after 30 s, and a fresh one starts bare.
set -euo pipefail
STASH=${STASH:-/root/stash}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export SEMIAR_HOME=$STASH/home PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
T15=$STASH/qwen2.5-coder-1.5b-instruct.gguf
T05=$STASH/qwen2.5-coder-0.5b-instruct.gguf
case "${1:-}" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    for pair in "q15:$T15" "q05:$T05"; do
      src=$STASH/${pair%%:*}.gguf dst=${pair#*:}
      if [ ! -f "$dst" ] && ls "$src".[0-9][0-9] >/dev/null 2>&1; then
        cat "$src".[0-9][0-9] > "$dst" && rm "$src".[0-9][0-9]
      fi
    done
    ls -la "$STASH"
    ;;
  step)
    python3 scripts/gpu/step_cost.py --model "$T15" --profile --variants "${VARIANTS:-graphs,compiled,compiled-gemv}" --out "$OUT" 2>&1 | grep -v -i 'warn\|Loading weights'
    ;;
  bench)
    python3 -m semiar.cli bench --device cuda --target "$T15" --draft-model "$T05" \
      --methods ${METHODS:-ar,draft,pld,ngram,hf-ar,hf-assisted,hf-pld} --tasks ${TASKS:-code,edit} \
      --n-prompts ${N:-2} --max-new-tokens ${TOKENS:-128} --allow-near-ties ${COMPILE:+--compile} --out "$OUT/bench" \
      2>&1 | tr '\r' '\n' | grep -v 'Loading weights' | tail -45
    ;;
  *) echo "usage: $0 setup|step|bench" >&2; exit 2 ;;
esac
