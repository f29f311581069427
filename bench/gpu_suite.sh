#!/usr/bin/env bash
# The GPU benchmark suite of docs/performance.md, as one prepared script for one H100/H200 machine
# (jax with CUDA, flax, optax, orbax, transformers; no internet). Under 8 minutes there.
#
#   bench/gpu_suite.sh            # on the GPU machine; results under $OUT (default bench/results/gpu_suite)
#   bench/gpu_suite.sh --dry-run  # anywhere: the same steps on CPU with tiny shapes
#
# 1. Dependencies: what the machine lacks (ml_collections, grain, ...) is installed from
#    bench/wheelhouse/ without the network; bench/make_wheelhouse.sh fills that folder beforehand,
#    where pip can reach an index. The repository itself is put on PYTHONPATH (no pip install).
# 2. Side by side with open_clip (AMP bf16, torch.compile): ViT-B/32 and ViT-B/16 at batch 256,
#    ViT-L/14 at 128, bf16 (bench/train_step.py). Without torch/open_clip, ours alone.
# 3. MFU sweep, ours alone: ViT-B/16 over batch size x remat policy.
# 4. Ours alone at the sweep's largest batch: layers unrolled instead of scanned, and the chunked
#    CLIP and SigLIP losses instead of the all-gather CLIP loss.
# 5. Evaluation throughput: embedding extraction against a pure forward (bench/eval_throughput.py).
# 6. The host's input pipeline in images/s (bench/bench_pipeline.py), to set against the steps'
#    samples/s: the issue allows the real pipeline 5% of step time.
# 7. $OUT/summary.md gathers every table; each run also leaves its JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
OUT="${OUT:-bench/results/gpu_suite}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

# the requirement (pinned as in requirements.txt) of each module this machine lacks; jax, flax,
# optax and orbax are the machine's own (its CUDA build of jax must stay)
missing=$($PY - <<'PY'
import importlib.util, re
modules = {"ml_collections": "ml-collections", "grain": "grain", "array_record": "array-record", "PIL": "pillow",
           "ftfy": "ftfy", "regex": "regex", "tokenizers": "tokenizers", "safetensors": "safetensors",
           "tqdm": "tqdm", "scipy": "scipy", "tensorboardX": "tensorboardX", "absl": "absl-py",
           "transformers": "transformers"}
pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("requirements.txt").read(), re.M))
print(" ".join(f"{r}=={pins[r]}" if r in pins else r for m, r in modules.items()
               if importlib.util.find_spec(m) is None))
PY
)
if [[ -n "$missing" ]]; then
  echo "[gpu_suite] installing what this machine lacks from bench/wheelhouse: $missing" >&2
  if [[ ! -d bench/wheelhouse ]]; then
    echo "[gpu_suite] bench/wheelhouse is absent: run bench/make_wheelhouse.sh PYTHON_VERSION where an index" \
         "is reachable, and carry the folder here" >&2
    exit 2
  fi
  # shellcheck disable=SC2086  # one requirement per word
  $PY -m pip install -q --no-index --find-links bench/wheelhouse $missing
fi

if (( DRY_RUN )); then
  DEVICE=cpu; ROWS=("tiny-ViT 8"); SWEEP_MODEL=tiny-ViT; SWEEP_BATCHES=(8); STEPS=(--steps 2 --warmup 1)
  COMPILE=(); CHUNK=4; EVAL=(--batch 8 --images 16 --repeats 1)
  PIPELINE=(--copies 1 --images 14 --batches 1 --repeats 1)
else
  DEVICE=gpu; ROWS=("ViT-B-32 256" "ViT-B-16 256" "ViT-L-14 128"); SWEEP_MODEL=ViT-B-16
  SWEEP_BATCHES=(256 512); STEPS=(--steps 10 --warmup 3); COMPILE=(--torch-compile)
  CHUNK=128; EVAL=(--batch 256 --images 2048 --repeats 3); PIPELINE=(--copies 8 --images 600 --batches 8 --repeats 3)
fi

status=0
for row in "${ROWS[@]}"; do
  read -r model batch <<< "$row"
  timeout 240 $PY bench/train_step.py --device "$DEVICE" --model "$model" --batch "$batch" --dtype bfloat16 \
    "${STEPS[@]}" "${COMPILE[@]}" --out "$OUT" || { echo "[gpu_suite] $model failed" >&2; status=1; }
done
for remat in none dots_saveable full; do
  for batch in "${SWEEP_BATCHES[@]}"; do
    timeout 120 $PY bench/train_step.py --device "$DEVICE" --model "$SWEEP_MODEL" --batch "$batch" \
      --dtype bfloat16 --remat "$remat" --no-openclip "${STEPS[@]}" --out "$OUT" --label "_remat-$remat" \
      || { echo "[gpu_suite] sweep $remat $batch failed" >&2; status=1; }
  done
done

BIG="${SWEEP_BATCHES[-1]}"
for variant in "unrolled model.visual_scan=False model.text_scan=False" "loss-chunked loss.chunk_size=$CHUNK" \
               "loss-siglip loss.name=siglip"; do
  read -r label overrides <<< "$variant"
  overrides_args=()
  for kv in $overrides; do overrides_args+=(--config "$kv"); done
  timeout 180 $PY bench/train_step.py --device "$DEVICE" --model "$SWEEP_MODEL" --batch "$BIG" --dtype bfloat16 \
    --no-openclip "${STEPS[@]}" "${overrides_args[@]}" --out "$OUT" --label "_$label" \
    || { echo "[gpu_suite] $label failed" >&2; status=1; }
done
timeout 180 $PY bench/eval_throughput.py --model "$SWEEP_MODEL" --dtype bfloat16 "${EVAL[@]}" \
  --json "$OUT/eval_throughput.json" > "$OUT/eval_throughput.md" || { echo "[gpu_suite] eval throughput failed" >&2; status=1; }
timeout 300 $PY bench/bench_pipeline.py "${PIPELINE[@]}" > "$OUT/pipeline.md" \
  || { echo "[gpu_suite] input pipeline failed" >&2; status=1; }

{
  echo "# GPU suite ($(date -u +%Y-%m-%d), $([[ $DRY_RUN == 1 ]] && echo 'dry run on CPU' || echo GPU))"
  for f in "$OUT"/train_step_*.md; do echo; cat "$f"; done
  echo; echo "## Evaluation throughput ($SWEEP_MODEL, bf16)"; echo; cat "$OUT/eval_throughput.md"
  echo; echo "## Input pipeline (this host)"; echo; cat "$OUT/pipeline.md"
} > "$OUT/summary.md"
echo "[gpu_suite] wrote $OUT/summary.md" >&2
exit $status
