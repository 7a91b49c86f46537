#!/usr/bin/env bash
# The fine-tuning demo end to end on CPU: fetch SmolLM2-135M-Instruct (GGUF), LoRA-train it on the
# shipped pirate dataset (examples/data/pirate.jsonl), then ask the same unseen question without and
# with the adapter. Takes 10-20 minutes on 2 cores. Usage: scripts/demo-pirate.sh [extra train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-smollm2.sh
cargo build --release --quiet
memtune=target/release/memtune
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
"$memtune" train --config examples/data/pirate-smollm2.toml "$@"
question="What is the capital of France?"
echo "== without the adapter"
"$memtune" generate --model "$model" --chat --prompt "$question"
echo "== with runs/pirate/adapter"
"$memtune" generate --model "$model" --adapter runs/pirate/adapter --chat --prompt "$question"
