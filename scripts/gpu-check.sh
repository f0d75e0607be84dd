#!/usr/bin/env bash
# The GPU check (docs/gpu.md): on a CUDA machine that has PyTorch and this checkout but no
# internet, install asap's other packages from wheels fetched beforehand, run the test suite with
# its CUDA tests, then time the paper's Table 4 shapes (random weights, bfloat16) with
# `asap profile`, writing a log, the JSON and a summary into the output folder. About 5 minutes
# on one H200.
#
#   scripts/gpu-check.sh --fetch-wheels [DIR]       here, where pip reaches a registry: the wheels
#     [--skip NAME,...]                             of every package asap needs but torch (DIR: .whl),
#                                                   but those the target is known to have
#   scripts/gpu-check.sh [--wheels DIR] [--out DIR] there: the check (--out: $OUT if set, else
#                                                   runs/gpu-check)
#   scripts/gpu-check.sh --dry-run [...]            anywhere: what it would run; checks the wheels
#                                                   and the commands' options, needs no GPU
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TARGET_PYTHON=${TARGET_PYTHON:-3.12}  # the GPU machine's Python, for the compiled wheels
WHEELS=.whl
OUT_DIR=${OUT:-runs/gpu-check}
SITE=${SITE:-/tmp/asap-site}  # where the wheels are installed (pip --target), first on PYTHONPATH
MODE=check
SKIP=""
MODELS=(llava-1.5-7b llava-next-7b)
PROFILE_OPTIONS=(--random-weights --device cuda --dtype bfloat16 --methods vanilla,fastv,asap -k 192,128,64
  --repeats 20 --warmup 3 --json)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --fetch-wheels) MODE=fetch; if [ $# -gt 1 ] && [ "${2#-}" = "$2" ]; then WHEELS=$2; shift; fi ;;
    --wheels) [ $# -gt 1 ] || { echo "Error: --wheels takes a folder" >&2; exit 2; }; WHEELS=$2; shift ;;
    --skip) SKIP=${2:?--skip takes NAME,...}; shift ;;
    --out) OUT_DIR=${2:?--out takes a folder}; shift ;;
    --dry-run) MODE=dry-run ;;
    -h|--help) usage; exit 0 ;;
    *) echo "Error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

fetch_wheels() {
  # Pinned to the versions installed here (those the tests pass with); pure-Python projects
  # published only as source (fvcore, iopath) are built into wheels here.
  mkdir -p "$WHEELS"
  "$PYTHON" scripts/wheel_list.py requirements --python "$TARGET_PYTHON" --skip "$SKIP" \
    > "$WHEELS/requirements.txt" || return 1
  local platforms=() n requirement
  for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  grep -v '^#' "$WHEELS/requirements.txt" | while read -r requirement; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PYTHON" \
      --implementation cp "${platforms[@]}" -d "$WHEELS" "$requirement" 2>/dev/null && continue
    "$PYTHON" -m pip wheel -q --no-deps --no-binary=:all: -w "$WHEELS" "$requirement" || exit 1
  done || return 1
  if ls "$WHEELS"/*.whl | grep -v -e '-none-any\.whl$' -e 'x86_64' >&2; then
    echo "Error: the wheels above were built for this machine only" >&2; return 1
  fi
  "$PYTHON" scripts/wheel_list.py check "$WHEELS" || return 1
  echo "$(ls "$WHEELS"/*.whl | wc -l) wheels in $WHEELS: $(du -sh "$WHEELS" | cut -f1) (the checkout: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes)"
}

# Each step: its command, and how long it may take (10 minutes in all on one H200).
STEPS=(
  "install|60|$PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $WHEELS/*.whl"
  "environment|60|nvidia-smi; $PYTHON -c 'import sys, torch, transformers; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name()); print(\"transformers\", transformers.__version__)'"
  "cuda-tests|180|$PYTHON -m pytest -p no:cacheprovider -v -m cuda tests"
  "other-tests|240|$PYTHON -m pytest -p no:cacheprovider -q -rs -m 'not cuda' tests"
)
for model in "${MODELS[@]}"; do
  STEPS+=("profile-$model|120|$PYTHON -m asapcli profile -m $model ${PROFILE_OPTIONS[*]} > $OUT_DIR/$model.jsonl")
done

dry_run() {
  local status=0 step
  echo "Would run, in $PWD, with PYTHONPATH=$SITE:$PWD HF_HUB_OFFLINE=1, writing into $OUT_DIR:"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<< "$step"
    printf '  [%s, at most %s s] %s\n' "$name" "$limit" "$command"
  done
  echo "then $OUT_DIR/summary.txt (each step's status, the prefill times beside the paper's Table 4)."
  bash -n "$0" || status=1
  if "$PYTHON" scripts/wheel_list.py check "$WHEELS"; then
    echo "ok: every wheel of $WHEELS/requirements.txt is there ($(du -sh "$WHEELS" | cut -f1))"
  else
    status=1
  fi
  # The profile commands' options, parsed by the CLI itself (nothing runs).
  PYTHONPATH=$PWD "$PYTHON" - "${MODELS[@]}" "${PROFILE_OPTIONS[@]}" <<'EOF' || status=1
import sys
import typer
from asapcli.cli import app
models, options = sys.argv[1:3], sys.argv[3:]
profile = typer.main.get_command(app).commands["profile"]
for model in models:
    profile.make_context("profile", ["-m", model, *options])  # parses and converts; runs nothing
    print(f"ok: asap profile -m {model} {' '.join(options)}: its options parse")
EOF
  return $status
}

summary() {
  # The prefill times of each model beside the paper's Table 4.
  PYTHONPATH=$SITE:$PWD "$PYTHON" - "$OUT_DIR" "${MODELS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, models = Path(sys.argv[1]), sys.argv[2:]
paper = {  # Table 4, CUDA time (ms) of the prefill, LLaVA-1.5-7B (the paper does not name its GPU)
    ("llava-1.5-7b", "vanilla", None): 38.27, ("llava-1.5-7b", "fastv", 192): 33.65, ("llava-1.5-7b", "asap", 192): 35.13,
    ("llava-1.5-7b", "fastv", 128): 31.45, ("llava-1.5-7b", "asap", 128): 33.45,
}
print(f"{'model':<15}{'method':<9}{'k':>5}{'visual':>8}{'kept':>6}{'prefill ms':>12}{'IQR %':>7}{'time %':>8}{'95% interval':>15}{'peak MB':>9}{'paper ms':>10}  verdict")
for model in models:
    path = out / f"{model}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    for row in rows:
        k = row["k"]
        low, high = row["time_ratio_interval"]
        verdict = "stable" if row["stable"] else "unstable: " + "; ".join(row["unstable"].values())
        print(f"{model:<15}{row['method']:<9}{'-' if k is None else k:>5}{row['visual_tokens']:>8}{row['kept_tokens']:>6}"
              f"{row['prefill_seconds'] * 1000:>12.2f}{row['prefill_seconds_iqr'] / row['prefill_seconds'] * 100:>7.1f}"
              f"{row['time_ratio'] * 100:>8.1f}{f'{low * 100:.1f}-{high * 100:.1f}':>15}{row['peak_memory_bytes'] / 2**20:>9.0f}"
              f"{paper.get((model, row['method'], k), ''):>10}  {verdict}")
    if rows:
        print(f"  ({rows[0]['device']}, {rows[0]['dtype']}, random weights: {rows[0]['random_weights']}, "
              f"{rows[0]['decoder_layers']} of {rows[0]['decoder_layers_full']} layers, {rows[0]['prompt_tokens']} prompt tokens)")
EOF
}

check() {
  # On a GPU lent for minutes, a missing wheel must stop the check before anything starts.
  if ! "$PYTHON" scripts/wheel_list.py check "$WHEELS"; then
    echo "Error: the wheels are not all in $WHEELS: run scripts/gpu-check.sh --fetch-wheels $WHEELS first (where pip reaches a registry)" >&2
    return 1
  fi
  mkdir -p "$OUT_DIR"
  local log=$OUT_DIR/gpu-check.log failed=0 step started
  : > "$log"
  export PYTHONPATH=$SITE:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<< "$step"
    echo "== $name (at most $limit s): $command" | tee -a "$log"
    started=$SECONDS
    timeout "$limit" bash -c "$command" >> "$log" 2>&1
    local status=$?
    echo "== $name: exit $status, $((SECONDS - started)) s" | tee -a "$log" | tee -a "$OUT_DIR/steps.txt"
    [ $status -eq 0 ] || failed=1
    if [ "$name" = install ] && [ $status -ne 0 ]; then break; fi
  done
  { cat "$OUT_DIR/steps.txt"; echo; summary; } > "$OUT_DIR/summary.txt" 2>> "$log"
  rm -f "$OUT_DIR/steps.txt"
  cat "$OUT_DIR/summary.txt"
  return $failed
}

case "$MODE" in
  fetch) fetch_wheels ;;
  dry-run) dry_run ;;
  check) check ;;
esac
