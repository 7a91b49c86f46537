#!/usr/bin/env bash
# Every combination of method × precision × checkpointing × optimizer trains the tiny model for 30
# steps with a falling loss, and every one of those × both loss modes profiles with components that
# sum exactly to the measured peak. ~5 minutes on 2 cores. Usage: scripts/check-all-knobs.sh
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet || exit 1
B=target/release/memtune
data=$(mktemp -d)/d.txt
for i in $(seq 30); do printf 'The quick brown fox jumps over the lazy dog.\n\nA stitch in time saves nine.\n\n'; done > "$data"
fail=0; n=0
for m in full lora qlora; do for p in fp32 bf16 fp16 bf16-pure; do for c in none full every:2; do for o in adamw adamw8bit adafactor sgd; do
  out=$($B train --model tiny --data "$data" --steps 30 --method $m --checkpointing $c --optimizer $o --precision $p --json --seq 64 --batch 2 --eval-fraction 0 2>&1 | tail -1)
  ok=$(python3 -c "
import json,sys
try:
  j=json.loads(sys.argv[1]); print('OK' if j['final_loss']<j['initial_loss'] else 'FAIL', round(j['initial_loss'],3), round(j['final_loss'],3))
except Exception: print('ERR', sys.argv[1][:200])
" "$out")
  n=$((n+1)); case "$ok" in OK*) ;; *) fail=$((fail+1)); echo "train $m $p $c $o: $ok";; esac
  for l in chunked full; do
    pj=$($B profile --model tiny --method $m --checkpointing $c --optimizer $o --precision $p --loss $l --seq 32 --batch 2 --steps 1 --json 2>&1 | tail -1)
    python3 -c "import json,sys; j=json.loads(sys.argv[1]); assert j['peak_bytes']>0 and sum(j['components'].values())==j['peak_bytes']" "$pj" 2>/dev/null \
      || { fail=$((fail+1)); echo "profile $m $p $c $o $l: ${pj:0:200}"; }
  done
done; done; done; done
echo "train runs: $n, failures (train + profile): $fail"
[ "$fail" -eq 0 ]
