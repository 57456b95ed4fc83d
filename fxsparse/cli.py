"""The ``fxsparse`` command (and ``python -m fxsparse``): sparsify a HuggingFace causal LM, check it, export it.

Flags follow Model Optimizer's ``hf_sa.py``::

    fxsparse --sparse_attn skip_softmax_calib --verify_output            # built-in SmolLM2-135M-Instruct
    fxsparse --pyt_ckpt_path ./my-llama --sparse_attn skip_softmax --export_dir ./my-llama-sparse

User errors (a missing path, a model without attention or none that ``--attn_pattern`` matches, out-of-range
values, ``triton`` without a GPU, a hub name without network) are one line on stderr and exit code 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

USAGE_ERROR = 2

# Without a GPU, calibration defaults shrink so that the README's main job takes minutes on a CPU.
GPU_CALIB = {"samples": 64, "max_seqlen": 8192, "heldout_samples": 8}
CPU_CALIB = {"samples": 4, "max_seqlen": 1024, "heldout_samples": 1}


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message and exits; we want one line
        raise CLIError(f"{message} (see fxsparse --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fxsparse",
        description="Skip-softmax attention sparsity for a HuggingFace causal LM: rewrite its attention, "
                    "optionally calibrate the threshold law, verify generation dense vs sparse, export.",
        epilog="Example: fxsparse --sparse_attn skip_softmax_calib --verify_output  "
               "(runs on the built-in SmolLM2-135M-Instruct; fetch it with `python -m fxsparse.assets fetch`).",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--pyt_ckpt_path", default=None,
                       help="HuggingFace model directory, hub name, or .gguf file "
                            "(default: the built-in SmolLM2-135M-Instruct Q4_1 GGUF)")
    model.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    model.add_argument("--backend", choices=("pytorch", "triton"), default=None,
                       help="sparse attention kernel (default: triton on a GPU, pytorch otherwise)")
    sparse = parser.add_argument_group("sparsity")
    sparse.add_argument("--sparse_attn", choices=("skip_softmax", "skip_softmax_calib"), default=None,
                        help="skip_softmax: fixed thresholds (prefill 1e-3, decode 1e-4); skip_softmax_calib: "
                             "calibrate λ = a·exp(b·S + o(L))/L^p. Default: the sparsity recorded in the checkpoint "
                             "(an fxsparse export), else skip_softmax")
    sparse.add_argument("--attn_pattern", default=None, metavar="PATTERN",
                        help="which attention sites the preset sparsifies: fnmatch'd against the attention module "
                             "path, e.g. model.layers.3.self_attn (default: the presets' '*attn*'; GPT-NeoX and "
                             "Falcon name theirs 'attention': use '*attention*')")
    sparse.add_argument("--target_sparse_ratio", default=None,
                        help="target tile sparsity S in [0, 0.99]: one value or prefill,decode (default 0.5)")
    sparse.add_argument("--calib_samples", type=int, default=None,
                        help=f"calibration samples (default {GPU_CALIB['samples']} on GPU, {CPU_CALIB['samples']} on CPU)")
    sparse.add_argument("--calib_max_seqlen", type=int, default=None,
                        help=f"longest calibration sample, >= 1024 (default {GPU_CALIB['max_seqlen']} on GPU, "
                             f"{CPU_CALIB['max_seqlen']} on CPU)")
    sparse.add_argument("--calib_data_dir", default=None,
                        help="folder of Paul Graham essays *.txt for calibration and --verify_output "
                             "(default: the fxsparse asset cache)")
    check = parser.add_argument_group("verification and export")
    check.add_argument("--verify_output", action="store_true",
                       help="answer one long-document question dense then sparse; print both answers, "
                            "time and measured sparsity")
    check.add_argument("--seq_len", type=int, default=2048, help="--verify_output prompt length in tokens (default: %(default)s)")
    check.add_argument("--max_new_tokens", type=int, default=32, help="--verify_output answer length (default: %(default)s)")
    check.add_argument("--export_dir", default=None,
                       help="write a HuggingFace checkpoint with sparse_attention_config in config.json")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


# -- validation: one loud line per problem --


def _positive(value: int | None, flag: str, low: int = 1) -> None:
    if value is not None and value < low:
        raise CLIError(f"{flag} must be >= {low}, got {value}")


def parse_target(text: str | None) -> dict[str, float] | None:
    """``"0.5"`` → both phases; ``"0.6,0.4"`` → prefill 0.6, decode 0.4; each in [0, 0.99]."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise CLIError(f"--target_sparse_ratio must be a number or prefill,decode numbers, got {text!r}") from None
    if len(values) not in (1, 2) or not all(0.0 <= v <= 0.99 for v in values):
        raise CLIError(f"--target_sparse_ratio must be one or two values in [0, 0.99], got {text!r}")
    return {"prefill": values[0], "decode": values[-1]}


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a torch device (try cpu, cuda, cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


def validate(args: argparse.Namespace) -> None:
    _positive(args.seq_len, "--seq_len", 64)
    _positive(args.max_new_tokens, "--max_new_tokens")
    _positive(args.calib_samples, "--calib_samples")
    _positive(args.calib_max_seqlen, "--calib_max_seqlen", 1024)
    args.target = parse_target(args.target_sparse_ratio)
    if args.attn_pattern is not None and args.attn_pattern.strip() in ("", "default", "calibration"):
        raise CLIError(f"--attn_pattern must be an fnmatch pattern over attention module paths (e.g. '*attention*'), "
                       f"got {args.attn_pattern!r}")
    calib_flags = [f for f in ("calib_samples", "calib_max_seqlen") if getattr(args, f) is not None]
    if calib_flags and args.sparse_attn != "skip_softmax_calib":
        raise CLIError(f"--{calib_flags[0]} needs --sparse_attn skip_softmax_calib")
    if args.target is not None and args.sparse_attn == "skip_softmax":  # before minutes of loading, not after
        raise CLIError("--target_sparse_ratio needs a calibrated law: --sparse_attn skip_softmax_calib, not skip_softmax")
    if args.calib_data_dir is not None and not Path(args.calib_data_dir).is_dir():
        raise CLIError(f"--calib_data_dir {args.calib_data_dir}: no such directory")
    if args.export_dir is not None and Path(args.export_dir).is_file():
        raise CLIError(f"--export_dir {args.export_dir} is a file; give a directory")
    args.device = _device(args.device)
    # sites get "auto" unless --backend is given: it resolves to the same kernel here, and an exported
    # checkpoint then reloads on any device (a recorded "triton" fails on CPU, "pytorch" is slow on a GPU)
    args.site_backend = args.backend or "auto"
    if args.backend is None:
        args.backend = "triton" if args.device.type == "cuda" else "pytorch"
    if args.backend == "triton" and args.device.type != "cuda":
        raise CLIError("--backend triton needs a CUDA GPU (device is cpu); use --backend pytorch")


# -- loading --


def _looks_like_path(text: str) -> bool:
    """Hub names are ``name`` or ``org/name``; anything else path-like is a local path."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith(".gguf") or os.sep != "/" and os.sep in text


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    if os.environ.get("HF_HUB_OFFLINE"):
        return False
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load(path: str | None, device, dtype) -> tuple[Any, Any, str]:
    """(model, tokenizer, description) from a directory, a .gguf file or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        from .assets import smollm2_gguf

        path, what = str(smollm2_gguf()), "built-in SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
    else:
        what = path
    location = Path(path).expanduser()
    kwargs: dict[str, Any] = {}
    if location.suffix == ".gguf":
        if not location.is_file():
            raise CLIError(f"--pyt_ckpt_path {path}: no such .gguf file")
        source, kwargs["gguf_file"] = str(location.parent), location.name
    elif location.exists():
        if not (location / "config.json").is_file():
            raise CLIError(f"--pyt_ckpt_path {path}: not a HuggingFace model directory (no config.json)")
        source = str(location)
    elif _looks_like_path(path):
        raise CLIError(f"--pyt_ckpt_path {path}: no such file or directory")
    else:
        source = path
        kwargs["local_files_only"] = not _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as error:
        if kwargs.get("local_files_only"):
            raise CLIError(f"--pyt_ckpt_path {path}: not a local path, not in the HuggingFace cache, and the hub "
                           f"is unreachable (no network?)") from error
        raise CLIError(f"--pyt_ckpt_path {path}: {str(error).splitlines()[0]}") from error
    return model.to(device).eval(), tokenizer, what


# -- the run --


def _config(args: argparse.Namespace, recorded) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """(sparse config without calibration, calibration section or None, description of what is applied)."""
    from .config import ATTENTION_PATTERN, SKIP_SOFTMAX_CALIB, SKIP_SOFTMAX_DEFAULT

    mode = args.sparse_attn or ("recorded" if recorded is not None else "skip_softmax")
    if mode == "recorded":
        if args.attn_pattern is not None:  # the recorded config names its sites: no preset pattern to replace
            raise CLIError("--attn_pattern chooses the sites of a preset, and this checkpoint records its own: "
                           "add --sparse_attn skip_softmax or skip_softmax_calib to replace the recorded sparsity")
        config = copy.deepcopy(recorded.config)
        what = "the sparsity recorded in the checkpoint"
    else:
        config = copy.deepcopy(SKIP_SOFTMAX_CALIB if mode == "skip_softmax_calib" else SKIP_SOFTMAX_DEFAULT)
        what = ("skip_softmax with fixed thresholds (prefill λ=1e-3, decode λ=1e-4)" if mode == "skip_softmax"
                else "skip_softmax_calib: calibrated λ = a·exp(b·S + o(L))/L^p per phase")
        if args.attn_pattern is not None:
            config["sparse_cfg"][args.attn_pattern] = config["sparse_cfg"].pop(ATTENTION_PATTERN)
            what += f" on the sites matching {args.attn_pattern!r}"
    for key, settings in config["sparse_cfg"].items():
        if key not in ("calibration", "default") or settings.get("enable"):
            settings["backend"] = args.site_backend
    calibration = config["sparse_cfg"].pop("calibration", None)
    if calibration is not None:
        defaults = GPU_CALIB if args.device.type == "cuda" else CPU_CALIB
        calibration.update(
            samples=args.calib_samples or defaults["samples"],
            max_seqlen=args.calib_max_seqlen or defaults["max_seqlen"],
            heldout_samples=defaults["heldout_samples"],
            data_dir=args.calib_data_dir,
        )
        if args.target is not None:
            calibration["target_sparse_ratio"] = dict(args.target)
    elif args.target is not None and mode != "recorded":
        raise CLIError("--target_sparse_ratio needs --sparse_attn skip_softmax_calib "
                       "(or a checkpoint with a recorded calibrated law)")
    return {"sparse_cfg": config["sparse_cfg"]}, calibration, what


def run(args: argparse.Namespace) -> int:
    import torch

    import fxsparse
    from .config import UnmatchedPatternError
    from .hf_checkpoint import export_hf, recorded_sparsity
    from .sites import sites_of

    validate(args)
    out = sys.stdout
    dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    start = time.perf_counter()
    print(f"fxsparse {fxsparse.__version__}: device {args.device}, backend {args.backend}, dtype {dtype}", file=out)
    model, tokenizer, what = load(args.pyt_ckpt_path, args.device, dtype)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {what} — {type(model).__name__}, {num_params / 1e6:.1f}M parameters, "
          f"loaded in {time.perf_counter() - start:.1f} s", file=out)

    recorded = recorded_sparsity(model.config)
    if recorded is not None:
        print(f"found in the checkpoint: {recorded.describe()}", file=out)
    config, calibration, applied = _config(args, recorded)  # its flag errors come before the dense run

    prompt = dense = None
    if args.verify_output:  # the dense answer comes from the model as loaded, before any rewrite
        from .verify import build_prompt, generate

        prompt = build_prompt(tokenizer, args.seq_len, args.calib_data_dir)
        print(f"verify: {prompt.length}-token question prompt; dense answer from the original model first", file=out)
        dense = generate(model, tokenizer, prompt, args.max_new_tokens, progress="dense")

    try:
        fxsparse.sparsify(model, config)
    except UnmatchedPatternError as error:  # its message lists the sites; the CLI adds the flag that picks them
        raise CLIError(f"{error}; pass --attn_pattern to choose them (e.g. --attn_pattern '*attention*')") from error
    sites = sites_of(model)
    if not sites:
        raise CLIError(f"no attention found in {what}: nothing to sparsify")
    if args.sparse_attn is None and recorded is not None:
        recorded.apply(sites)
    enabled = sum(site.enabled for site in sites.values())
    print(f"found {len(sites)} attention sites ({enabled} enabled); applied {applied}", file=out)

    if calibration is not None:
        cpu_defaults = args.device.type != "cuda" and (args.calib_samples is None or args.calib_max_seqlen is None)
        note = " (CPU defaults: fewer and shorter samples, so that it takes minutes)" if cpu_defaults else ""
        print(f"calibrating: {calibration['samples']} samples up to {calibration['max_seqlen']} tokens + "
              f"{calibration['heldout_samples']} held out, target {calibration['target_sparse_ratio']}{note}", file=out)
        try:
            result = fxsparse.calibrate(model, {"sparse_cfg": {"calibration": calibration}}, tokenizer=tokenizer)
        except RuntimeError as error:  # e.g. no phase could be fitted: a result, not a crash
            raise CLIError(f"calibration failed: {error}") from error
        print(result.format(), file=out)
    elif args.target is not None:
        fxsparse.set_target_sparsity(model, args.target)
        print(f"target sparsity set to {args.target}", file=out)

    if prompt is not None:
        from .verify import verify

        result = verify(model, tokenizer, prompt, args.max_new_tokens, progress=True, dense=dense)
        print(result.format(), file=out)
        if args.backend == "pytorch":
            print("note: backend pytorch is the exact reference implementation (the correctness oracle), not a fast "
                  "kernel; the time it saves needs --backend triton on a GPU", file=out)

    print(fxsparse.summary(model, file=None), file=out)
    if args.export_dir is not None:
        directory = export_hf(model, args.export_dir, tokenizer)
        print(f"exported to {directory} (config.json has sparse_attention_config; reload with "
              f"AutoModelForCausalLM.from_pretrained, then fxsparse.sparsify(model) restores the sparsity)", file=out)
    print(f"done in {time.perf_counter() - start:.1f} s", file=out)
    return 0


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fxsparse").setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        args = build_parser().parse_args(argv)
    except CLIError as error:
        print(f"fxsparse: error: {_one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    try:
        with warnings.catch_warnings():
            if not debug:  # Dynamo's tracing notes about the model's code are not the user's business
                warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._dynamo")
            return run(args)
    except (CLIError, ValueError, FileNotFoundError, OSError) as error:
        if debug:
            raise
        print(f"fxsparse: error: {_one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
    except Exception as error:
        if debug:
            raise
        print(f"fxsparse: internal error: {type(error).__name__}: {_one_line(error)} (rerun with --debug for the "
              f"traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
