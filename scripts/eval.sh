#!/usr/bin/env bash
# Reproduces the evaluation tables of docs/evaluation.md: for each dataset, tokenize the
# catalog, train with a recipe file (recipes/*.toml), evaluate beside the baselines. The
# model ranks as its recipe says (sidrec.json), so eval takes no ranking flags.
#
#   scripts/eval.sh                    # every dataset below, one after the other
#   scripts/eval.sh ml-100k            # recipes/movielens.toml, about 20 min on 2 cores
#   scripts/eval.sh demo               # recipes/demo.toml + the held-out language requests
#   scripts/eval.sh amazon-scientific  # recipes/amazon.toml, 45-70 min (needs ../shared/data)
#   scripts/eval.sh ml-1m              # movielens + small config, about 2 h
#   scripts/eval.sh mixed              # movies + products in one catalog: type steering,
#                                      # Amazon's categories and brands in words
#
# Each dataset is one line of DATASETS: its catalog, interactions, tokenize flags, recipe
# and the recipe settings it changes (--set). Tables measured before recipes existed name
# their commit in docs/evaluation.md; check that commit out to reproduce them digit for
# digit.
#
# Output under out/eval-DATASET/ (artifacts/, model/, eval/ with eval.md, eval.json and
# the plots). Environment: SIDREC_PYTHON (a Python with numpy and torch for the peers;
# without torch the SASRec row is skipped with a note), SIDREC_PEERS (default
# ../shared/peers), SIDREC_SHARED (default ../shared), SIDREC_EVAL_USERS (evaluate a
# seeded sample of users instead of all), SIDREC_THREADS (default 2), SIDREC_MAX_STEPS
# (stop each training after this many steps: a quick check of the script, not the table).
set -euo pipefail
cd "$(dirname "$0")/.."

shared=${SIDREC_SHARED:-../shared}
threads=${SIDREC_THREADS:-2}

# dataset | catalog | interactions | tokenize flags | recipe | recipe settings | eval flags
DATASETS=(
    "ml-100k|assets/ml-100k/ml-100k.item|assets/ml-100k/ml-100k.inter|--type movie|movielens|"
    "demo|assets/ml-100k/ml-100k.item|assets/ml-100k/ml-100k.inter|--type movie|demo||--requests tests/data/requests/movielens.jsonl"
    "ml-1m|assets/ml-1m/ml-1m.item|assets/ml-1m/ml-1m.inter|--type movie|movielens|base=../models/small.json dropout=0.2 stage2_epochs=2 rank.mix_recent=2 rank.memory=4"
    "amazon-scientific|$shared/data/amazon-scientific/items.json|$shared/data/amazon-scientific/interactions.json|--type product|amazon|"
    "mixed|out/eval-mixed/data/items.jsonl|out/eval-mixed/data/interactions.jsonl||movielens|steer_per_user=2 stage2_epochs=2 search_per_item=2 request_vectors=true taste_vectors=true|--requests tests/data/requests/amazon-scientific.jsonl"
)

cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/sidrec

run_one() {
    local ds=$1 items=$2 inter=$3 tok=$4 recipe=$5 sets=$6 evalflags=$7
    local out=out/eval-$ds
    if [[ $ds == mixed ]]; then
        # MovieLens-100k movies and Amazon Scientific products in one catalog; 400
        # users cross types, each two users' histories interleaved, the others stay
        # within one (examples/mix_catalogs.rs writes it).
        cargo run --release --quiet --example mix_catalogs -- --cross 400 "$out/data" \
            movie assets/ml-100k/ml-100k.{item,inter} \
            product "$shared"/data/amazon-scientific/{items,interactions}.json
    fi
    for f in "$items" "$inter"; do
        if [[ ! -f $f ]]; then
            echo "$f is missing (scripts/fetch-assets.sh fetches MovieLens; Amazon comes from $shared)" >&2
            return 1
        fi
    done
    local set_args=()
    for s in $sets; do set_args+=(--set "$s"); done
    if [[ -n ${SIDREC_MAX_STEPS:-} ]]; then set_args+=(--set "max_steps=$SIDREC_MAX_STEPS"); fi
    local eval_args=()
    if [[ -n ${SIDREC_EVAL_USERS:-} ]]; then eval_args+=(--users "$SIDREC_EVAL_USERS"); fi
    for f in $evalflags; do eval_args+=("$f"); done
    # shellcheck disable=SC2086 # $tok is a list of flags
    (
        set -x
        "$bin" --threads "$threads" tokenize "$items" $tok -o "$out/artifacts" --force
        "$bin" --threads "$threads" train --artifacts "$out/artifacts" --interactions "$inter" \
            -o "$out/model" --force --recipe "recipes/$recipe.toml" "${set_args[@]}"
        "$bin" --threads "$threads" eval --model "$out/model" --interactions "$inter" \
            -o "$out/eval" --force --name "$ds" "${eval_args[@]}"
    )
}

wanted=${1:-all}
found=0
for line in "${DATASETS[@]}"; do
    IFS='|' read -r ds items inter tok recipe sets evalflags <<<"$line"
    if [[ $wanted == all || $wanted == "$ds" ]]; then
        found=1
        run_one "$ds" "$items" "$inter" "$tok" "$recipe" "$sets" "$evalflags"
    fi
done
if [[ $found == 0 ]]; then
    echo "unknown dataset $wanted (ml-100k, demo, ml-1m, amazon-scientific, mixed, or none for all)" >&2
    exit 2
fi
