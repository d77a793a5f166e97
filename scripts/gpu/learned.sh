#!/usr/bin/env bash
# The learned-drafter comparison of issue 8 on one GPU: medusa, hydra, eagle and falcon trained on ONE
# self-distilled data set of qwen2.5-coder-1.5b-instruct, then one bench per temperature over
# ar, draft, pld, medusa, hydra, eagle, falcon (+ medusa-typical at T=1, marked lossy).
#   scripts/gpu/learned.sh          data + the four trainings + greedy bench + T=1 bench
#   scripts/gpu/learned.sh train    data + the four trainings only
#   scripts/gpu/learned.sh bench    the two benches (drafters already trained)
# Same setup as fast.sh (staged q15.gguf.NN / q05.gguf.NN pieces in $STASH, wheels in .whl/). Expected on an H100
# (falcon.sh measured 136 s data + 120 s training at these settings): data ~140 s once; training
# ~2 min each for falcon and eagle, ~2-3 min each for medusa and hydra (4 vocabulary-sized heads);
# benches ~4 + 3 min: about 20 minutes in all, so run `train` and `bench` as separate calls.
set -euo pipefail
STASH=${STASH:-/root/stash}
OUT=${OUT:-runs/gpu-learned}
mkdir -p "$OUT"
export SEMIAR_HOME=$STASH/home PYTHONUNBUFFERED=1
bash "$(dirname "$0")/fast.sh" setup >/dev/null  # wheels, and the staged pieces joined under their model names
export PYTHONPATH=/tmp/site:$PWD/src
TARGET=$STASH/qwen2.5-coder-1.5b-instruct.gguf
DRAFT=$STASH/qwen2.5-coder-0.5b-instruct.gguf
DATA=$STASH/q15-data.pt
N=${N:-2}
EPOCHS=${EPOCHS:-6}
DRAFTERS="medusa=$STASH/medusa-q15,hydra=$STASH/hydra-q15,eagle=$STASH/eagle-q15,falcon=$STASH/falcon-q15"
TREES=${TREES:-"falcon=dynamic:8,6,48;eagle=dynamic:6,6,48"}

train() {
  for m in ${METHODS:-falcon eagle medusa hydra}; do
    # the first run makes $DATA, the others reuse it (same target and data settings)
    python3 -m semiar.cli train-drafter --method "$m" --target "$TARGET" --out "$STASH/$m-q15" --data "$DATA" \
      --device cuda --gen-batch ${GEN_BATCH:-820} --samples ${SAMPLES:-3} -n ${GEN_TOKENS:-384} --epochs "$EPOCHS" \
      --batch-tokens ${BATCH_TOKENS:-16384} --lr ${LR:-3e-4} 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -8 \
      | tee "$OUT/train-$m.log"
    cp "$STASH/$m-q15/train_summary.json" "$OUT/train_summary-$m.json"
  done
}

bench() {
  python3 -m semiar.cli bench --target "$TARGET" --draft-model "$DRAFT" --drafter "$DRAFTERS" \
    --methods ar,draft,pld,medusa,hydra,eagle,falcon --tasks code,chat --n-prompts "$N" \
    --max-new-tokens ${TOKENS:-128} --device cuda --tree "$TREES" --allow-near-ties --out "$OUT/bench-greedy" \
    2>&1 | tr '\r' '\n' | grep -v 'Loading weights' | tail -40
  python3 -m semiar.cli bench --target "$TARGET" --draft-model "$DRAFT" --drafter "$DRAFTERS" \
    --methods ar,draft,pld,medusa,hydra,eagle,falcon,medusa-typical --tasks code,chat --n-prompts "$N" \
    --temperature 1 --max-new-tokens ${TOKENS:-96} --device cuda --tree "$TREES" --out "$OUT/bench-t1" \
    2>&1 | tr '\r' '\n' | grep -v 'Loading weights' | tail -40
}

case "${1:-all}" in
  train) train ;;
  bench) bench ;;
  all) train; bench ;;
  *) echo "usage: $0 [train|bench|all]" >&2; exit 2 ;;
esac
