#!/usr/bin/env bash
# One GPU lease, as back-to-back calls (an idle machine is given back after 30 s):
#   stage the GGUFs (../shared/gpu/stage-file; q15.gguf, q05.gguf, s135.gguf pieces into /root/stash; a call
#   carries at most 64 MiB with the checkout, which holds the 15 MB shipped drafter: PIECE_MB=45), then
#   scripts/gpu/session.sh smol      SmolLM2-135M: self-distilled data + the Falcon drafter the README's
#                                    demo ships (bf16 copy to $OUT), K3=1/NOGLANCE=1 add the ablation drafters
#   scripts/gpu/session.sh falcon    Qwen2.5-Coder-1.5B: self-distilled data + the Falcon drafter
#   scripts/gpu/session.sh learned-data    Qwen2.5-Coder-1.5B, the learned-drafter recipe (docs/learned.md): token-only data,
#                                    self-distilled answers to ShareGPT prompts + ShareGPT conversations teacher-forced
#   scripts/gpu/session.sh learned-ablate  the ABLATE variants on that data at once, TRAIN_SECS each; the best one's settings
#                                    go to $STASH/best.args
#   scripts/gpu/session.sh learned   the drafter with the best settings (or EXTRA): 32k draft vocabulary, one layer,
#                                    int8 on disk, TRAIN_SECS of training; the drafter into $OUT
#   scripts/gpu/session.sh heads     the same data: eagle, medusa, hydra (same epochs as falcon)
#   scripts/gpu/session.sh greedy    one greedy bench: every engine method, the four drafters, the peers
#   scripts/gpu/session.sh t1        one T=1 bench of the sampling-capable methods (+ medusa-typical, lossy)
#   scripts/gpu/session.sh step      decode / verify step cost: eager, CUDA graphs, per-layer torch.compile, with
#                                    cuBLAS / the one-row Triton kernel / the fused one-token step (with and without
#                                    PDL) / the tree forwards' block attention (AUTOTUNE=1: + Triton mm autotuning;
#                                    VARIANTS= any of step_cost.py's), kernel profiles (scripts/gpu/step_cost.py);
#                                    MODEL=random:qwen2.5-1.5b times the same shapes with random weights, no staging;
#                                    PROFILE_SIZES=16,64: also the tree forwards' kernels; PRODUCTS=1,16,64: the
#                                    products alone for blocks of that many rows, cuBLAS and cuBLASLt; CHAINS=2,6,12:
#                                    greedy chains of that many tokens in one replay vs stepped (a draft model)
#   scripts/gpu/session.sh tests     the suite's GPU part on the GPU (no staging needed): pytest -m "not real and not slow"
#                                    over tests/models (the kernel tests take CUDA tensors there, compiled Triton) and
#                                    the drafters' graph tests; log, JUnit XML and the summary line under $OUT
# The benches compile the models (semiar bench's default on CUDA); TREES sets per-method trees (default: each method's own);
# for greedy, SAME_TEXT=1 times every lossless method on ar's text (--same-text) and REPEATS=N takes medians of N runs.
# Each step leaves a results tarball (and drafter weights) under $OUT; docs/benchmarks.md quotes them.
# Set SECS below the device time left: a command the lease cuts off returns only what is under $OUT
# by then (the benches and step_cost.py write there as they go).
set -uo pipefail
STASH=${STASH:-/root/stash}
OUT=${OUT:-runs/gpu-session}
mkdir -p "$OUT" "$STASH/runs"
export SEMIAR_HOME=$STASH/home PYTHONUNBUFFERED=1
here=$(dirname "$0")
bash "$here/fast.sh" setup >/dev/null  # wheels, and the staged pieces joined under their model names
if [ ! -f "$STASH/smollm2-135m-instruct.gguf" ] && ls "$STASH"/s135.gguf.[0-9][0-9] >/dev/null 2>&1; then
  cat "$STASH"/s135.gguf.[0-9][0-9] > "$STASH/smollm2-135m-instruct.gguf" && rm "$STASH"/s135.gguf.[0-9][0-9]
fi
export PYTHONPATH=/tmp/site:$PWD/src
T15=$STASH/qwen2.5-coder-1.5b-instruct.gguf
T05=$STASH/qwen2.5-coder-0.5b-instruct.gguf
S135=$STASH/smollm2-135m-instruct.gguf
RUNS=$STASH/runs
# the draft model where it was staged (methods that need it are left out otherwise)
DRAFT_MODEL=$([ -f "$T05" ] && echo "$T05")
EPOCHS=${EPOCHS:-6}
TRAIN=(--device "${DEVICE:-cuda}" ${N_PROMPTS:+--n-prompts "$N_PROMPTS"} --gen-batch "${GEN_BATCH:-820}" --samples "${SAMPLES:-3}" -n "${GEN_TOKENS:-384}"
       --epochs "$EPOCHS" --batch-tokens "${BATCH_TOKENS:-16384}" --lr "${LR:-3e-4}")
# the drafters whose training finished, and the methods that can run without the others
DRAFTERS="" SKIP=""
for m in medusa hydra eagle falcon; do
  if [ -f "$STASH/$m-q15/model.safetensors" ]; then DRAFTERS="$DRAFTERS${DRAFTERS:+,}$m=$STASH/$m-q15"; else SKIP="$SKIP $m"; fi
done
# more entries for method variants (bench's METHOD@LABEL), e.g. EXTRA_DRAFTERS='falcon@shipped=DIR'
DRAFTERS="$DRAFTERS${EXTRA_DRAFTERS:+${DRAFTERS:+,}$EXTRA_DRAFTERS}"
methods() {  # methods LIST: LIST without the learned methods that have no drafter (and draft without its model)
  local out="" m
  [ -n "$DRAFT_MODEL" ] || SKIP="$SKIP draft hf-assisted"
  for m in ${1//,/ }; do
    case " $SKIP " in *" ${m%-typical} "*) echo "!! no $m drafter: left out" >&2 ;; *) out="$out${out:+,}$m" ;; esac
  done
  echo "$out"
}
TREES=${TREES:-}

train() {  # train METHOD TARGET OUTDIR DATA [extra args]: a failed training is reported, the session goes on
  local m=$1 target=$2 dir=$3 data=$4; shift 4
  echo "== train $m -> $dir"
  python3 -m semiar.cli train-drafter --method "$m" --target "$target" --out "$dir" --data "$data" "${TRAIN[@]}" "$@" \
    2>&1 | tr '\r' '\n' | grep -v '^\s*$' | grep -v 'Loading weights' | tail -6 | tee "$RUNS/train-$(basename "$dir").log"
  cp "$dir/train_summary.json" "$RUNS/train_summary-$(basename "$dir").json" 2>/dev/null || echo "!! $m did not finish"
}

bf16_copy() {  # bf16_copy DIR NAME: the drafter's weights in bf16 (what the package ships) + config into $OUT
  python3 - "$1" "$OUT/$2" <<'EOF'
import sys, torch
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1] + "/model.safetensors")
save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, sys.argv[2] + ".safetensors",
          metadata={"method": "falcon"})
EOF
  cp "$1/config.json" "$OUT/$2.config.json"
}

learned_train() {  # learned_train OUTDIR [args]: the learned-drafter recipe (docs/learned.md) on the shared data
  local dir=$1; shift
  python3 -m semiar.cli train-drafter --method falcon --target "$T15" --out "$dir" --device "${DEVICE:-cuda}" \
    --data "$STASH/learned-data.pt" --prompts sharegpt --n-prompts "${N_PROMPTS:-2000}" --max-prompt-len "${PROMPT_LEN:-256}" \
    --gen-batch "${GEN_BATCH:-1024}" -n "${GEN_TOKENS:-256}" --text sharegpt ${N_TEXT:+--n-text "$N_TEXT"} \
    --draft-vocab "${VOCAB:-32768}" --num-layers "${LAYERS:-1}" -k "${K:-2}" --intermediate-size "${WIDTH:-2816}" --store int8 \
    --epochs "${EPOCHS:-2}" --batch-tokens "${BATCH_TOKENS:-32768}" --max-len "${MAX_LEN:-2048}" \
    --time-budget "${TRAIN_SECS:-300}" --lr "${LR:-5e-4}" --save-every 100000 ${INIT:+--init "$INIT"} "$@" \
    2>&1 | tr '\r' '\n' | grep -v '^\s*$' | grep -v 'Loading weights'
}

pack() { tar czf "$OUT/$1.tgz" -C "$STASH" runs && ls -la "$OUT"; }

bench() {  # bench NAME SECONDS [bench args]: stopped with SIGINT at SECONDS, keeping the prompts that finished
  local name=$1 secs=$2; shift 2
  # straight under $OUT: a command cut off by the lease's limit still returns the prompts that
  # finished (results.partial.json, written after each prompt)
  timeout -s INT "$secs" python3 -m semiar.cli bench --device "${DEVICE:-cuda}" --out "$OUT/$name" "$@" \
    2>&1 | tr '\r' '\n' | grep -v 'Loading weights' | grep -v '^\s*$' | tail -70
  rm -f "$OUT/$name"/*.png.tmp
  cp -r "$OUT/$name" "$RUNS/"
}

case "${1:-}" in
  smol)
    train falcon "$S135" "$STASH/falcon-s135" "$STASH/s135-data.pt" --epochs "${SMOL_EPOCHS:-10}"
    bf16_copy "$STASH/falcon-s135" falcon-s135
    [ -n "${K3:-}" ] && train falcon "$S135" "$STASH/falcon-s135-k3" "$STASH/s135-data.pt" -k 3 --epochs "${SMOL_EPOCHS:-10}" \
      && bf16_copy "$STASH/falcon-s135-k3" falcon-s135-k3
    [ -n "${NOGLANCE:-}" ] && train falcon "$S135" "$STASH/falcon-s135-ng" "$STASH/s135-data.pt" --no-glance --epochs "${SMOL_EPOCHS:-10}" \
      && bf16_copy "$STASH/falcon-s135-ng" falcon-s135-ng
    pack smol
    ;;
  falcon)
    train falcon "$T15" "$STASH/falcon-q15" "$STASH/q15-data.pt"
    pack falcon
    ;;
  learned-data)  # the data once, token-only: self-distilled answers to ShareGPT prompts + ShareGPT conversations
    learned_train "$STASH/learned-0" --max-steps 1
    cp "$STASH/learned-0/train_summary.json" "$OUT/train_summary-learned-data.json" 2>/dev/null || echo "!! data step failed"
    ;;
  learned-ablate)  # the variants in ABLATE ("name:args;name:args"), at once on the one GPU, same data and seconds
    IFS=';' read -ra variants <<< "${ABLATE:-base:--no-norms;norms:--norms;norms-tok:--norms --reg-weight 0.1 --token-weight 1;norms-tok-ttt:--norms --reg-weight 0.1 --token-weight 1 --ttt 0.5}"
    for v in "${variants[@]}"; do
      name=${v%%:*}; args=${v#*:}
      # shellcheck disable=SC2086
      (learned_train "$STASH/abl-$name" $args > "$RUNS/train-abl-$name.log" 2>&1; \
       cp "$STASH/abl-$name/train_summary.json" "$OUT/train_summary-abl-$name.json" 2>/dev/null) &
    done
    wait
    tail -n 3 "$RUNS"/train-abl-*.log
    python3 - "$OUT" "$STASH/best.args" "${variants[@]}" <<'EOF2'
import json, sys
out, best_path, variants = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = []
for v in variants:
    name, args = v.split(":", 1)
    try:
        s = json.load(open(f"{out}/train_summary-abl-{name}.json"))
    except OSError:
        print(f"!! {name} did not finish"); continue
    rows.append((s["val"]["acc"], name, args, s["val"]["acc_by_offset"], s["steps"], s["trained_tokens"]))
    print(f"{name:16s} acc {s['val']['acc']:.4f} by offset {s['val']['acc_by_offset']} steps {s['steps']} tokens {s['trained_tokens']}")
if rows:
    best = max(rows)
    open(best_path, "w").write(best[2])
    print("best:", best[1], best[2])
EOF2
    ;;
  learned)  # the drafter: the best ablation variant's settings (or EXTRA), TRAIN_SECS of training, into $OUT
    dir=$STASH/falcon-q15
    extra=${EXTRA:-$(cat "$STASH/best.args" 2>/dev/null)}
    echo "== train falcon (learned recipe, $extra) -> $dir"
    # shellcheck disable=SC2086
    learned_train "$dir" $extra 2>&1 | awk 'NR % 20 == 0 || /data|vocab|drafter|error|Error|step/' | tail -40 | tee "$RUNS/train-falcon-q15.log"
    cp "$dir/train_summary.json" "$OUT/train_summary-falcon-q15.json" 2>/dev/null || echo "!! falcon did not finish"
    # a call returns files of at most 16 MiB: the drafter comes back in pieces (cat falcon-q15.safetensors.* to join)
    split -b 15M -d -a 1 "$dir/model.safetensors" "$OUT/falcon-q15.safetensors." && cp "$dir/config.json" "$OUT/falcon-q15.config.json"
    sha256sum "$dir/model.safetensors"
    ls -la "$OUT"
    ;;
  heads)
    for m in ${HEADS:-eagle medusa hydra}; do train "$m" "$T15" "$STASH/$m-q15" "$STASH/q15-data.pt"; done
    pack heads
    ;;
  greedy)
    bench "${NAME:-greedy}" "${SECS:-540}" --target "$T15" ${DRAFT_MODEL:+--draft-model "$DRAFT_MODEL"} ${DRAFTERS:+--drafter "$DRAFTERS"} ${TREES:+--tree "$TREES"} ${COMPILE:+--compile} \
      ${SAME_TEXT:+--same-text} ${REPEATS:+--repeats "$REPEATS"} \
      --methods "$(methods "${METHODS:-ar,draft,pld,ngram,lookahead,copy,auto,medusa,hydra,eagle,falcon,hf-ar,hf-assisted,hf-pld}")" \
      --tasks "${TASKS:-code,edit,chat}" --n-prompts "${N:-2}" --max-new-tokens "${TOKENS:-128}" --allow-near-ties
    pack "${NAME:-greedy}"
    ;;
  t1)
    bench t1 "${SECS:-400}" --target "$T15" ${DRAFT_MODEL:+--draft-model "$DRAFT_MODEL"} ${DRAFTERS:+--drafter "$DRAFTERS"} ${TREES:+--tree "$TREES"} ${COMPILE:+--compile} \
      --methods "$(methods "${METHODS:-ar,draft,pld,lookahead,medusa,hydra,eagle,falcon,medusa-typical}")" \
      --tasks "${TASKS:-code,chat}" --n-prompts "${N:-2}" --max-new-tokens "${TOKENS:-96}" --temperature 1
    pack t1
    ;;
  step)
    timeout -s INT "${SECS:-560}" python3 scripts/gpu/step_cost.py --model "${MODEL:-$T15}" --profile --out "$OUT/step" \
      ${PROFILE_SIZES:+--profile-sizes "$PROFILE_SIZES"} ${PRODUCTS:+--products "$PRODUCTS"} ${CHAINS:+--chains "$CHAINS"} \
      --variants "${VARIANTS:-compiled,compiled-gemv,compiled-fused,compiled-fused-tree${AUTOTUNE:+,compiled-autotune}}" \
      2>&1 | grep -v -i 'warn\|Loading weights'
    cp -r "$OUT/step" "$RUNS/" 2>/dev/null
    pack step
    ;;
  tests)
    # compiled kernels, not the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 only without /dev/nvidia0)
    export TRITON_INTERPRET=0
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")' \
      | tee "$OUT/tests-env.txt"
    timeout -s INT "${SECS:-540}" python3 -m pytest -q -rfs -p no:cacheprovider -m "not real and not slow" \
      --durations=10 --junitxml "$OUT/tests.xml" ${TESTS:-tests/models tests/drafters/test_falcon.py} 2>&1 \
      | tee "$OUT/tests.log" | tail -60
    tail -n 1 "$OUT/tests.log" | tee -a "$OUT/tests-env.txt"
    ;;
  *) echo "usage: $0 smol|falcon|learned-data|learned-ablate|learned|heads|greedy|t1|step|tests" >&2; exit 2 ;;
esac
