#!/usr/bin/env bash
# One device call for the kernels: GPU tests, launch-config sweep, decode benchmark, Nsight Compute
# profile. Logs and JSON go to $OUT. With .assets/gguf_a carried it also does call 1 of the SmolLM2
# accuracy run (bench/accuracy_gpu_part1.sh), so bench/accuracy_gpu.sh can follow on this machine.
#   KERNEL_BENCH: the benchmark files to run (default: both prefill and decode)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 BENCH_OUT=$OUT
[ -f .assets/gguf_a ] && bash bench/accuracy_gpu_part1.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
timeout 130 python3 -m pytest -q tests/test_triton.py -p no:cacheprovider 2>&1 | tee $OUT/gpu_tests.log | tail -4
timeout 70 python3 bench/gpu_check.py --skip-check --lengths 16384 32768 --decode 32768 131072 --batches 1 32 \
    --variants base --decode-variants base,t1 --out $OUT 2>&1 | tee $OUT/sweep.log | grep -v "^{" | tail -30
timeout 100 python3 -m pytest -q ${KERNEL_BENCH:-bench/test_prefill.py bench/test_decode.py} -p no:cacheprovider \
    --benchmark-disable-gc 2>&1 | tee $OUT/bench.log | tail -3
timeout 110 ncu --nvtx --nvtx-include "prof/" --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    python3 bench/profile_kernels.py > $OUT/ncu.txt 2>&1; echo "ncu rc=$?"; grep -cE "Duration" $OUT/ncu.txt
