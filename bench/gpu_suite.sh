#!/usr/bin/env bash
# GPU tests, calibration speed, end-to-end prefill. Logs and JSON go to $OUT.
# Needs the git-ignored .assets/ (a saved SmolLM2 tokenizer and the essays) carried along.
# All of test_triton.py runs on a GPU (not only the @gpu-marked tests: the kernel checks that the CPU runs in an
# interpreter child run directly there); with a cold Triton cache that is ~5 of the call's 10 minutes, so
# STEPS=tests or STEPS=bench splits the suite over two calls (default: both).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 BENCH_OUT=$OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
STEPS=${STEPS:-tests,bench}
if [[ $STEPS == *tests* ]]; then
    timeout 420 python3 -m pytest -q tests/test_triton.py tests/test_gpu_e2e.py -p no:cacheprovider 2>&1 \
        | tee $OUT/gpu_tests.log | tail -25
fi
[[ $STEPS == *bench* ]] || exit 0
timeout 200 python3 bench/calib_speed.py --tokenizer .assets/smollm2_tokenizer --essays .assets/PaulGrahamEssays \
    --out $OUT/calib_speed.json 2>&1 | tee $OUT/calib_speed.log | tail -30
timeout 150 python3 -m pytest -q bench/test_e2e.py -p no:cacheprovider 2>&1 | tee $OUT/e2e.log | tail -30
