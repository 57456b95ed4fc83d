"""Where end-to-end prefill time goes: torch.profiler over one 32k forward of the e2e model (4 layers,
random weights), HF sdpa vs ``sparsify`` dense with the Triton backend. Prints the top CUDA ops of each.

    PYTHONPATH=. python bench/profile_e2e.py
"""

import copy
import functools

import torch
from torch.profiler import ProfilerActivity, profile

import fxsparse
from bench.test_e2e import _base_model, _fx_config

SEQ_LEN = 32768


@torch.no_grad()
def main():
    ids = torch.randint(3, 128000, (1, SEQ_LEN), device="cuda")
    base = _base_model("sdpa")
    sparse = fxsparse.sparsify(copy.deepcopy(base), _fx_config(0.0))
    for name, model in (("hf_sdpa", base), ("fx_dense", sparse)):
        call = functools.partial(model, input_ids=ids, use_cache=False, logits_to_keep=1)
        call(), call()  # compile and warm up outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        print(f"==== {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))


if __name__ == "__main__":
    main()
