#!/usr/bin/env bash
# Exact resume on a GPU, end to end through the CLI with the tiny model (defaults: bf16, compile on, 2 workers):
# two uninterrupted 6-step runs and one cut after step 3 and resumed with --resume auto; prints their losses
# per step. Run from the repository root on a machine with a GPU and cogvx's dependencies importable.
set -euo pipefail
root=$PWD
work=$(mktemp -d)
cd "$work"
export COGVX_HOME=$work/home
python3 -m cogvx preprocess --data "$root/examples/clips" --model tiny --output shards > /dev/null 2>&1
common=(--shards shards --rank 4 --max-steps 6 --checkpoint-every 3 --workers 2)
python3 -m cogvx train "${common[@]}" --output runs/first 2> /dev/null
python3 -m cogvx train "${common[@]}" --output runs/second 2> /dev/null
python3 -m cogvx train "${common[@]}" --output runs/cut --max-steps 3 2> /dev/null
python3 -m cogvx train "${common[@]}" --output runs/cut --resume auto 2> /dev/null
python3 - <<'PY'
import json

runs = {name: {r["step"]: r for r in map(json.loads, open(f"runs/{name}/metrics.jsonl"))} for name in ("first", "second", "cut")}
print("step | first run | second run | cut at 3, resumed | same samples in all three")
for step in sorted(runs["first"]):
    rows = [runs[name][step] for name in runs]
    print(step, *(f"{r['loss']:.6f}" for r in rows), all(r["samples"] == rows[0]["samples"] for r in rows), sep=" | ")
PY
rm -rf "$work"
