#!/bin/sh
# Regenerates this example report from real CPU measurements of the built-in `tiny` model.
# Run from the repository root:  sh reports/example/make.sh
#
# 1. examples/report_inputs.rs calibrates the cost model on real probes, judges it on held-out probes
#    (accuracy.csv), searches under a 32 MiB budget (candidates.csv, tuned.toml) and prints the
#    pick's knobs as flags.
# 2. `memtune profile` measures the pick and a few other configurations (profile.csv, one timeline
#    CSV per probe).
# 3. `memtune report` renders the charts and index.html from the input folder.
set -eu
IN=reports/example/input
OUT=reports/example
rm -rf "$IN"
mkdir -p "$IN"
# BIN may point at a folder holding already built `memtune` and `examples/report_inputs`.
if [ -z "${BIN:-}" ]; then
    cargo build --quiet --bin memtune --example report_inputs
    BIN=${CARGO_TARGET_DIR:-target}/debug
fi
PICK=$("$BIN/examples/report_inputs" "$IN" 32M)
i=1
profile() {
    "$BIN/memtune" profile --model tiny "$@" --csv "$IN/profile.csv" --timeline-csv "$IN/timeline-$i.csv" > /dev/null
    i=$((i + 1))
}
# shellcheck disable=SC2086 # the pick's flags are words
profile $PICK
profile --batch 2 --accum 4
profile --checkpointing full --batch 2 --accum 4
profile --precision bf16 --loss full --batch 2 --accum 4
profile --method full --batch 2 --accum 4
rm -f "$OUT"/*.svg "$OUT"/index.html
"$BIN/memtune" report --from "$IN" --out "$OUT"
