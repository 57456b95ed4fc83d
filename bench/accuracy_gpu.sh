#!/usr/bin/env bash
# Full SmolLM2 accuracy run on one GPU, device call 2 of 2 (bench/ACCURACY.md): SKIP_SOFTMAX_CALIB
# calibration (64 samples up to 8192), held-out check, KL per target pair, NIAH at 2k/4k/8k with 20
# prompts, float32 model on the Triton backend. Call 1 (bench/accuracy_gpu_part1.sh) left the GGUF's
# first half in ${FXSPARSE_RUN_DIR:-/tmp}; this call carries .assets/gguf_b, .assets/PaulGrahamEssays
# and .whl (the gguf wheel). Later calls on the same warm machine find the joined GGUF there and need
# not carry .assets/gguf_b. Writes under $OUT: accuracy_gpu.json (saved after every step, so a run
# stopped by the time limit keeps what it finished), accuracy_gpu.log, accuracy_gpu.md, device.txt.
#   ACCURACY_ARGS replaces the run's arguments (e.g. a small CPU rehearsal), ACCURACY_TIMEOUT its limit.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_MININTERVAL=20
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
RUN=${FXSPARSE_RUN_DIR:-/tmp}
CACHE=$RUN/fxsparse_cache
GGUF=$CACHE/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
: "${OUT:?set OUT to the folder for the results}"

# -- the model (kept from an earlier call on this machine, else joined from its halves), the essays and the
#    gguf package, all offline --
if ! echo "$GGUF_SHA256  $GGUF" | sha256sum -c --status - 2>/dev/null; then
    HALF_A=$RUN/fxsparse_gguf_a
    [ -f "$HALF_A" ] || HALF_A=.assets/gguf_a  # call 1's carried copy, if the machine kept it
    [ -f "$HALF_A" ] || { echo "no $RUN/fxsparse_gguf_a: run bench/accuracy_gpu_part1.sh on this machine first"; exit 3; }
    mkdir -p "$CACHE/smollm2"
    cat "$HALF_A" .assets/gguf_b > "$GGUF"
    echo "$GGUF_SHA256  $GGUF" | sha256sum -c - || exit 4
fi
ln -sfn "$PWD/.assets/PaulGrahamEssays" "$CACHE/PaulGrahamEssays"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$RUN/fxsparse_site" \
    .whl/*.whl || exit 5
export PYTHONPATH=$RUN/fxsparse_site:. FXSPARSE_CACHE=$CACHE
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import importlib.metadata as m; print({p: m.version(p) for p in ('torch', 'triton', 'transformers', 'gguf')})"
} | tee "$OUT/device.txt"

# -- the run; the report renders whatever the JSON holds --
ARGS=${ACCURACY_ARGS:---device cuda --backend triton --dtype float32 --heldout 16}
timeout -k 15 "${ACCURACY_TIMEOUT:-420}" python3 bench/accuracy.py $ARGS --out "$OUT/accuracy_gpu.json" 2>&1 \
    | tee "$OUT/accuracy_gpu.log"
rc=$?
[ -f "$OUT/accuracy_gpu.json" ] && python3 bench/accuracy_report.py "$OUT/accuracy_gpu.json" > "$OUT/accuracy_gpu.md"
echo "accuracy.py exit status $rc (124: stopped at the time limit; the JSON holds every finished step)"
exit $rc
