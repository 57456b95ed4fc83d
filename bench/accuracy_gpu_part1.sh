#!/usr/bin/env bash
# Full SmolLM2 accuracy run on one GPU, device call 1 of 2 (bench/ACCURACY.md): the GGUF (98 MB) is
# over one call's 64 MiB, so this call carries only its first half, .assets/gguf_a, and leaves it in
# ${FXSPARSE_RUN_DIR:-/tmp} for bench/accuracy_gpu.sh, which must follow on the same warm machine. Meanwhile
# it compiles the kernels that run needs into Triton's on-disk cache (bench/warm_kernels.py).
set -euo pipefail
RUN=${FXSPARSE_RUN_DIR:-/tmp}
cp .assets/gguf_a "$RUN/fxsparse_gguf_a"
ls -l "$RUN/fxsparse_gguf_a"
PYTHONPATH=. timeout -k 15 "${WARM_TIMEOUT:-420}" python3 bench/warm_kernels.py --device cuda 2>&1 | tee "${OUT:-.}/warm_kernels.txt"
