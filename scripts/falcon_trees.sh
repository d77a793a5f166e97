#!/usr/bin/env bash
# Falcon tree shapes on the CPU with the shipped SmolLM2-135M drafter: one bench per shape (ar + falcon,
# same prompts), then a table of tau and speedup per shape (docs/benchmarks.md).
#   bash scripts/falcon_trees.sh [OUT]
set -euo pipefail
OUT=${1:-runs/falcon-trees}
SEMIAR=${SEMIAR:-.venv/bin/semiar}
SHAPES=${SHAPES:-"dynamic:2,1,2 dynamic:4,1,4 dynamic:6,1,6 dynamic:4,2,6 dynamic:6,4,16 dynamic:8,6,48"}
for s in $SHAPES; do
  $SEMIAR bench --target smollm2-135m-instruct --methods ar,falcon --tree "falcon=$s" --tasks code,edit,chat \
    --n-prompts ${N:-2} --max-new-tokens ${TOKENS:-128} --out "$OUT/${s//[:,]/_}" >/dev/null 2>&1
done
python3 - "$OUT" $SHAPES <<'PY'
import json, sys
out, shapes = sys.argv[1], sys.argv[2:]
print("| tree | passes | nodes | tau | speedup vs ar (same run) |\n|---|---:|---:|---:|---:|")
for s in shapes:
    r = json.load(open(f"{out}/{s.replace(':', '_').replace(',', '_')}/results.json"))["summary"]["all"]["falcon"]
    d, t, b = (int(x) for x in s.split(":")[1].split(","))
    print(f"| `{s}` | {-(-d // 2)} | {b} | {r['tau']:.2f} | {r['speedup']:.2f}x |")
PY
