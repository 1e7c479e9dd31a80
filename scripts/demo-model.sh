#!/usr/bin/env bash
# Regenerates models/demo/, the model `sidrec recommend`, `repl` and `serve` use when no
# --model is given: the tiny config trained from scratch on MovieLens-100k with
# recipes/demo.toml (item text: title, year, genres; training sequences: the user
# histories; requests in words; request and taste vectors through assets/minilm), about
# an hour on 2 cores.
#
# The committed model was trained with --artifacts models/demo (the previous demo's SIDs,
# which the tokenize step below reproduces byte for byte, checked 2026-12-07), so its
# sidrec.json records that path and --check differs from it in sidrec.json alone.
#
#   scripts/demo-model.sh          # fetch, tokenize, train, replace models/demo/
#   scripts/demo-model.sh --check  # the same into out/demo-build/, then compare every
#                                  # file with the committed models/demo/SHA256SUMS
#
# Bit-for-bit: every step is seeded and runs on a fixed thread count (2), so the same
# binary on the same kind of CPU writes the same bytes. (Floating-point sums are ordered
# by the thread split and the SIMD width, so another CPU family may differ in the last
# bits; --check says so if it does.)
set -euo pipefail
cd "$(dirname "$0")/.."

check=0
if [[ ${1:-} == --check ]]; then check=1; fi

scripts/fetch-assets.sh >/dev/null
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/sidrec
build=out/demo-build
threads=2

set -x
"$bin" --threads $threads tokenize assets/ml-100k/ml-100k.item --type movie \
    -o "$build/artifacts" --force
"$bin" --threads $threads train --artifacts "$build/artifacts" \
    --interactions assets/ml-100k/ml-100k.inter -o "$build/model" --force \
    --recipe recipes/demo.toml --seed 0
set +x

# What a model directory needs to answer requests; train_report.json (loss curves, wall
# times) stays in the build directory: its timings differ from run to run.
files=(config.json generation_config.json model.safetensors tokenizer.json sidrec.json
    catalog.jsonl sids.jsonl codebooks.safetensors)
stage=$build/demo
rm -rf "$stage"
mkdir -p "$stage"
for f in "${files[@]}"; do cp "$build/model/$f" "$stage/$f"; done
(cd "$stage" && sha256sum "${files[@]}" >SHA256SUMS)
du -sh "$stage"

if [[ $check == 1 ]]; then
    if diff -u models/demo/SHA256SUMS "$stage/SHA256SUMS"; then
        echo "models/demo is reproduced bit for bit"
    else
        echo "models/demo differs from this build (see above)" >&2
        exit 1
    fi
else
    rm -rf models/demo.old
    if [[ -d models/demo ]]; then mv models/demo models/demo.old; fi
    mv "$stage" models/demo
    rm -rf models/demo.old
    echo "wrote models/demo"
fi
