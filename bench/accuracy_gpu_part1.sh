#!/usr/bin/env bash
# Full SmolLM2 accuracy run on one GPU, device call 1 of 2 (bench/ACCURACY.md): the GGUF (98 MB) is
# over one call's 64 MiB, so this call carries only its first half, .assets/gguf_a, and leaves it in
# ${FXSPARSE_RUN_DIR:-/tmp} for bench/accuracy_gpu.sh, which must follow on the same warm machine.
set -euo pipefail
RUN=${FXSPARSE_RUN_DIR:-/tmp}
cp .assets/gguf_a "$RUN/fxsparse_gguf_a"
ls -l "$RUN/fxsparse_gguf_a"
