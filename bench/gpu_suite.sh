#!/usr/bin/env bash
# One device call: GPU tests, calibration speed, end-to-end prefill. Logs and JSON go to $OUT.
# Needs the git-ignored .assets/ (a saved SmolLM2 tokenizer and the essays) carried along.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 BENCH_OUT=$OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
timeout 240 python3 -m pytest -q -m gpu tests/test_triton.py tests/test_gpu_e2e.py -p no:cacheprovider 2>&1 \
    | tee $OUT/gpu_tests.log | tail -25
timeout 200 python3 bench/calib_speed.py --tokenizer .assets/smollm2_tokenizer --essays .assets/PaulGrahamEssays \
    --out $OUT/calib_speed.json 2>&1 | tee $OUT/calib_speed.log | tail -30
timeout 150 python3 -m pytest -q bench/test_e2e.py -p no:cacheprovider 2>&1 | tee $OUT/e2e.log | tail -30
