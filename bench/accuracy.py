"""Accuracy of calibrated skip-softmax sparsity on SmolLM2-135M-Instruct (the GGUF from PyPI).

One measurement pass calibrates (``fxsparse.calibrate``); everything else reuses its laws through
``set_target`` (no new measurement). With per-length offsets (``length_offsets``), which are fitted at the target,
the laws are refitted from the same measured passes at each target instead (``law_writer``):

1. held-out check: achieved prefill/decode sparsity per length bin for targets 0.3 / 0.5 / 0.7;
2. global vs per-site law (with ``--laws-from``, also per-site laws pooled toward the model-wide one,
   ``--site-weights``): KL of next-token distributions vs dense on plain essay text, per
   (prefill, decode) target pair, over the prefill positions and over the last ``--kl-decode``
   tokens, fed one at a time through the KV cache (decode phase);
3. NIAH over the essays at the given lengths: dense vs (prefill, decode) target pairs, with the
   achieved sparsity of each run and the needle depth of each prompt (``--spare``: a hand-made per-site
   allocation at equal average prefill sparsity; ``--caps``, ``--exponents``, ``--match``: calibration's
   per-site cap, length exponent and bin matching, on or off, refitted from the saved run's passes,
   ``--fit-samples`` of them; ``--laws-from-heldout``: the held-out check too; bench/ACCURACY.md).

The dense baseline is the same rewritten model with its sites disabled. Calibration defaults are
those of ``SKIP_SOFTMAX_CALIB`` (64 samples up to 8192 tokens): minutes on a GPU, hours on a CPU::

    python -m fxsparse.assets fetch
    # CPU, small:
    python bench/accuracy.py --max-seqlen 2048 --samples 8 --heldout 4 --kl-length 1024 --niah-lengths 2048 --niah-prompts 4
    # the full run (bench/accuracy_gpu.sh):
    python bench/accuracy.py --device cuda --backend triton --heldout 16

Writes JSON (``--out``), saved after every step; ``bench/accuracy_report.py`` renders it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import functools
import itertools
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

import fxsparse
from fxsparse.api import COMPILER_ATTRIBUTE
from fxsparse.assets import essays_dir, load_default_model
from fxsparse.calibration.calibrate import FittedLaws, heldout_check, laws_from_passes, write_laws
from fxsparse.calibration.fit import mean_sparsity, solve_increasing
from fxsparse.calibration.measure import Pass, cache_kwargs, run_sample, sparsity_by_phase
from fxsparse.calibration.samples import Sample, build_samples, length_bins
from fxsparse.calibration.tasks import Corpus
from fxsparse.config import SKIP_SOFTMAX_CALIB, CalibrationConfig, SparseAttentionConfig

PRESET = SparseAttentionConfig.from_dict(SKIP_SOFTMAX_CALIB).calibration
NIAH_SEED = 4321
NIAH_NEW_TOKENS = 12


def sparse_smollm2(device: str = "cpu", dtype: torch.dtype = torch.float32, backend: str = "pytorch"):
    """(model, tokenizer, sites): SmolLM2 rewritten by ``sparsify``, every attention site enabled, 128×128 tiles."""
    model, tokenizer = load_default_model(device, dtype)
    site_cfg = {"br": 128, "bc": 128, "backend": backend, "enable": True}
    fxsparse.sparsify(model, {"sparse_cfg": {"*attn*": site_cfg, "default": {"enable": False}}})
    return model, tokenizer, fxsparse.sites_of(model)


def _pair(text: str) -> tuple[float, float]:
    prefill, _, decode = text.partition("/")
    return float(prefill), float(decode or prefill)


def _set_mode(sites, targets, write_law=None):
    """targets None → dense; else (prefill, decode) targets of the calibrated laws, written first by
    ``write_law(targets)`` when given (one of ``law_writer``)."""
    if targets is not None and write_law is not None:
        write_law(targets)
    for site in sites.values():
        site.set_enabled(targets is not None)
        if targets is not None:
            site.set_target({"prefill": targets[0], "decode": targets[1]})
        site.reset_stats()


def _achieved(sites) -> dict[str, float | None]:
    return {phase: skipped / valid if valid else None for phase, (skipped, valid) in sparsity_by_phase(sites).items()}


@torch.no_grad()
def _kl_text(tokenizer, length: int) -> torch.Tensor:
    corpus = Corpus(essays_dir())
    ids = tokenizer(" ".join(corpus.sentences[:2000]))["input_ids"][:length]
    return torch.tensor([ids])


@torch.no_grad()
def _log_probs(model, ids: torch.Tensor, decode_tokens: int) -> torch.Tensor:
    """Next-token log-probs (1, L, V) at every position of ``ids`` (1, L): one prefill forward over all
    but the last ``decode_tokens`` tokens, then those fed one at a time through the KV cache."""
    split = ids.shape[1] - decode_tokens
    kwargs = cache_kwargs(model)
    logits = [model(input_ids=ids[:, :split], **{**kwargs, "logits_to_keep": 0}).logits]
    logits += [model(input_ids=ids[:, t : t + 1], **kwargs).logits for t in range(split, ids.shape[1])]
    return torch.log_softmax(torch.cat(logits, 1).float(), -1)


def _kl(dense: torch.Tensor, sparse: torch.Tensor, decode_tokens: int) -> dict[str, float | None]:
    """Mean KL(dense ‖ sparse) of the next-token distributions, in nats, over each phase's positions."""
    per_position = (dense.exp() * (dense - sparse)).sum(-1)[0]
    split = per_position.numel() - decode_tokens
    return {"kl_prefill": float(per_position[:split].mean()),
            "kl_decode": float(per_position[split:].mean()) if decode_tokens else None}


def _niah_prompts(tokenizer, length: int, prompts: int) -> list[Sample]:
    """The first ``prompts`` single-needle prompts of bin ``length`` (sample i lands in bin i % bins,
    so the pool of ``prompts`` × bins holds them, and they do not depend on the pool size)."""
    pool = build_samples(tokenizer, prompts * len(length_bins(length)), length, seed=NIAH_SEED,
                         tasks=["niah_single_essay"])
    return [s for s in pool if s.bin == length][:prompts]


def _depth(tokenizer, sample: Sample) -> float:
    """Where the needle sits, as a fraction of the prompt text (0 = start, 1 = end)."""
    text = tokenizer.decode(sample.input_ids)
    return round(text.find(sample.answers[0]) / len(text), 3)


def _niah(model, tokenizer, sites, lengths, prompts: dict, pairs, dense=True, law_writers=None):
    """Yields one row per (length, law, config): needles found (and which), achieved sparsity, time.

    law_writers: name → one of ``law_writer`` (default: the laws the sites hold, unnamed).
    """
    law_writers = law_writers or {"": None}
    configs = [(None, "dense", None)] * dense + [
        (write, f"{p:g}/{d:g}" + (f" {law}" if law else ""), (p, d))
        for law, write in law_writers.items() for p, d in pairs]
    for length in lengths:
        samples = _niah_prompts(tokenizer, length, prompts[length])
        depths = [_depth(tokenizer, s) for s in samples]
        for write, label, targets in configs:
            _set_mode(sites, targets, write)
            start, hits = time.perf_counter(), []
            for sample in samples:
                out = tokenizer.decode(run_sample(model, sample.input_ids, length, NIAH_NEW_TOKENS))
                hits.append(all(a in out for a in sample.answers))
            row = {"length": length, "config": label, "correct": sum(hits), "prompts": len(samples),
                   "achieved": _achieved(sites), "seconds": time.perf_counter() - start}
            logging.info("NIAH %s", row)
            yield {**row, "hits": hits, "depths": depths}


def _run_config(args) -> CalibrationConfig:
    """``SKIP_SOFTMAX_CALIB``'s calibration with this run's sample counts, lengths and steps."""
    return dataclasses.replace(PRESET, samples=args.samples, max_seqlen=args.max_seqlen, chunk_size=args.chunk_size,
                               decode_steps=args.decode_steps, heldout_samples=args.heldout)


def _heldout_rows(model, sites, tokenizer, args, done=(), write_law=None):
    """Yields (target, rows of ``heldout_check``) for each of ``args.targets``, on the ``args.heldout`` samples
    after the fit's ``args.samples``; ``done``: calibrate()'s own rows, at the preset's target. ``write_law``: one
    of ``law_writer``; without it the laws the sites hold move to each target by ``set_target``."""
    cfg = _run_config(args)
    heldout = build_samples(tokenizer, args.samples + args.heldout, args.max_seqlen, seed=cfg.seed)[args.samples:]
    preset = cfg.target_sparse_ratio.to_dict()
    for target in [float(t) for t in args.targets.split(",") if t and args.heldout]:
        if done and all(abs(t - target) < 1e-9 for t in preset.values()):
            yield str(target), [vars(r) for r in done]  # calibrate() ran these samples at its own target
            continue
        _set_mode(sites, (target, target), write_law)
        rows = heldout_check(model, sites, heldout, cfg, {"prefill": target, "decode": target})
        logging.info("held-out %.1f: %s", target, [(r.phase, r.bin, round(r.achieved, 3)) for r in rows])
        yield str(target), [vars(r) for r in rows]


def _kl_rows(model, sites, tokenizer, args, pairs, law_writers):
    """Yields KL vs dense and achieved sparsity per (law, target pair); law_writers: name → one of ``law_writer``."""
    ids = _kl_text(tokenizer, args.kl_length).to(args.device)
    _set_mode(sites, None)
    dense = _log_probs(model, ids, args.kl_decode)
    for mode, write in law_writers.items():
        for pair in pairs:
            _set_mode(sites, pair, write)
            kl = _kl(dense, _log_probs(model, ids, args.kl_decode), args.kl_decode)
            row = {"law": mode, "targets": list(pair), **kl, "achieved": _achieved(sites)}
            logging.info("KL %s", row)
            yield row


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """What an earlier run's JSON holds for refitting: its measured passes, trial grid and targets."""

    passes: list[Pass]
    trials: list[float]
    targets: dict[str, float]

    @classmethod
    def load(cls, path: str | Path, samples: int | None = None) -> "SavedRun":
        return cls.from_json(json.loads(Path(path).read_text()), samples)

    @classmethod
    def from_json(cls, saved: dict, samples: int | None = None) -> "SavedRun":
        """A run of this script, or of ``bench/heldout_passes.py`` (then the targets are the preset's);
        ``samples``: keep only the passes of samples below that index (the fit's, the rest held out)."""
        passes = [Pass(p["phase"], p["sample"], p["kv_len"], np.asarray(p["valid"]), np.asarray(p["skipped"]))
                  for p in saved["passes"] if samples is None or p["sample"] < samples]
        calibration = saved.get("calibration", {})
        return cls(passes, calibration.get("trials", saved.get("trials")),
                   calibration.get("targets", PRESET.target_sparse_ratio.to_dict()))


def saved_laws(run: SavedRun, names: list[str], cfg: CalibrationConfig = PRESET) -> FittedLaws:
    """The laws ``calibrate`` with ``cfg`` writes, refitted from an earlier run's measured passes (the fit is
    deterministic: with that run's config, these are its laws)."""
    return laws_from_passes(run.passes, run.trials, run.targets, names, cfg)


def laws_for_targets(run: SavedRun, names: list[str], cfg: CalibrationConfig, at_each_target: bool, adjust=None):
    """``fitted(targets)``: the laws ``calibrate`` with ``cfg`` writes for the (prefill, decode) ``targets``, refitted
    from ``run``'s passes (cached). ``at_each_target``: calibrated at ``targets`` themselves; else once at ``run``'s
    targets, for ``set_target`` to move. ``adjust(fits)``: a change to the fitted laws (``--spare``)."""

    @functools.cache
    def fitted_at(at: tuple[float, float] | None) -> FittedLaws:
        targets = run.targets if at is None else {"prefill": at[0], "decode": at[1]}
        fits = saved_laws(dataclasses.replace(run, targets=targets), names, cfg)
        return adjust(fits) if adjust else fits

    return lambda targets: fitted_at(tuple(targets) if at_each_target else None)


def law_writer(sites, run: SavedRun, cfg: CalibrationConfig, adjust=None):
    """``write(targets)``: writes into ``sites`` the laws calibrated for the (prefill, decode) ``targets``
    (``laws_for_targets``): calibrated once and moved by ``set_target``, as a user would move them; with per-length
    offsets, calibrated at ``targets`` themselves, as the offsets are fitted at the target."""
    fitted = laws_for_targets(run, list(sites), cfg, cfg.length_offsets, adjust)

    def write(targets: tuple[float, float]) -> None:
        fits = fitted(targets)
        write_laws(sites, fits.laws, fits.site_laws, {"prefill": targets[0], "decode": targets[1]})

    return write


def law_variants(weights, caps, exponents, matches, offsets=(0,)) -> dict[str, CalibrationConfig]:
    """``SKIP_SOFTMAX_CALIB``'s calibration with each combination of pooling weight, per-site cap (0: none),
    length exponent, bin matching and per-length offsets, by name."""
    variants = {}
    for weight, cap, exponent, match, offset in itertools.product(weights, caps, exponents, matches, offsets):
        name = {0.0: "global", 1.0: "per_site"}.get(weight, f"pooled {weight:g}") + (f" cap {cap:g}" if cap else "")
        name += " p fitted" * bool(exponent) + " matched" * bool(match) + " + length offsets" * bool(offset)
        variants[name] = dataclasses.replace(PRESET, per_site_weight=weight, per_site_cap=cap or None,
                                             fit_length_exponent=bool(exponent), match_length_bins=bool(match),
                                             length_offsets=bool(offset))
    return variants


def _spared(site_laws: dict, passes: list[Pass], trials: list[float], spare: str, target: float = 0.5) -> dict:
    """An equal-average allocation: the prefill λ of the sites matching ``spare``'s pattern scaled by its factor
    (``"model.layers.1[0-9].*=0.1"``), every other site's by the one factor that keeps the mean prefill tile
    sparsity of the calibration ``passes`` at ``target`` what the unscaled laws give. Decode laws unchanged."""
    pattern, _, scale = spare.rpartition("=")
    names = list(site_laws)
    spared = np.array([fnmatch.fnmatchcase(name, pattern) for name in names])
    if not spared.any():
        raise ValueError(f"--spare: {pattern!r} matches no site; sites are {names}")
    base = [site_laws[name]["prefill"] for name in names]

    def mean(log_factors: np.ndarray) -> float:
        return mean_sparsity(passes, "prefill", trials, [law.scaled(np.exp(f)) for law, f in zip(base, log_factors)], target)

    spared_log, wanted = np.log(float(scale)), mean(np.zeros(len(names)))
    other_log = solve_increasing(lambda f: mean(np.where(spared, spared_log, f)) - wanted)
    factors = np.exp(np.where(spared, spared_log, other_log))
    logging.info("--spare %s: %d sites x%s, the other %d x%.3g (mean prefill sparsity of the passes %.3f)", pattern,
                 spared.sum(), scale, (~spared).sum(), np.exp(other_log), wanted)
    return {name: {**laws, "prefill": laws["prefill"].scaled(factor)}
            for (name, laws), factor in zip(site_laws.items(), factors)}


@contextlib.contextmanager
def _timed(seconds: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = round(time.perf_counter() - start, 1)


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        import triton

        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, triton {triton.__version__})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-seqlen", type=int, default=PRESET.max_seqlen)
    parser.add_argument("--samples", type=int, default=PRESET.samples)
    parser.add_argument("--heldout", type=int, default=PRESET.heldout_samples)
    parser.add_argument("--decode-steps", type=int, default=PRESET.decode_steps)
    parser.add_argument("--chunk-size", type=int, default=PRESET.chunk_size)
    parser.add_argument("--targets", default="0.3,0.5,0.7", help="held-out targets (both phases)")
    parser.add_argument("--pairs", default="0.3/0.3,0.5/0.5,0.7/0.7,0.3/0.5,0.5/0.3",
                        help="KL and NIAH (prefill/decode) targets")
    parser.add_argument("--niah-lengths", default="2048,4096,8192")
    parser.add_argument("--niah-prompts", default="20", help="prompts per NIAH length: one number, or one per length")
    parser.add_argument("--kl-length", type=int, default=4096, help="0: skip the KL comparison")
    parser.add_argument("--kl-decode", type=int, default=32, help="last tokens of the KL text run as decode steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="pytorch", choices=["pytorch", "triton"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="accuracy_results.json")
    parser.add_argument("--laws-from", help="reuse the laws of this earlier JSON (no calibration); run KL and NIAH")
    parser.add_argument("--niah-only", help="as --laws-from, but run only NIAH")
    parser.add_argument("--fit-samples", type=int, help="with --laws-from/--niah-only: fit only the passes of the first "
                             "this many samples (e.g. 64 of bench/heldout_passes.py's 80)")
    parser.add_argument("--site-weights", default="1,0",
                        help="with --laws-from/--niah-only: laws to compare, as weights of the per-site fit against the "
                             "model-wide law (1 = per-site, 0 = model-wide, between = pooled), e.g. 1,0.5,0")
    parser.add_argument("--spare", help="with --laws-from/--niah-only: PATTERN=FACTOR scales the prefill λ of the matching "
                             "sites and the others' by one factor that keeps the mean prefill sparsity (bench/ACCURACY.md)")
    parser.add_argument("--caps", default="0", help="with --laws-from/--niah-only: per-site sparsity caps to compare, "
                             "as multiples of the target 0.5 (calibration's per_site_cap; 0 = no cap), e.g. 0,1.15")
    parser.add_argument("--exponents", default="0", help="with --laws-from/--niah-only: fit_length_exponent values to "
                             "compare (0 = p = 1, 1 = fitted), e.g. 0,1")
    parser.add_argument("--match", default="0", help="with --laws-from/--niah-only: match_length_bins values to compare, "
                             "e.g. 0,1")
    parser.add_argument("--offsets", default="0", help="with --laws-from/--niah-only: length_offsets values to compare, "
                        "e.g. 0,1 (with 1 the held-out check refits the laws at each target)")
    parser.add_argument("--niah-dense", action="store_true", help="with --laws-from/--niah-only: also run dense NIAH")
    parser.add_argument("--laws-from-heldout", action="store_true", help="with --laws-from/--niah-only: also run the "
                             "held-out check (--heldout samples after --samples, at --targets) with the first law")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results: dict = {"device": _device_name(args.device),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                     "args": vars(args), "seconds": {}}
    seconds = results["seconds"]
    save = lambda: Path(args.out).write_text(json.dumps(results, indent=1))  # noqa: E731

    start = time.perf_counter()
    with _timed(seconds, "load_and_sparsify"):
        model, tokenizer, sites = sparse_smollm2(args.device, getattr(torch, args.dtype), args.backend)

    lengths = [int(x) for x in args.niah_lengths.split(",") if x]
    prompts = [int(x) for x in args.niah_prompts.split(",")]
    if len(prompts) not in (1, len(lengths)):
        parser.error(f"--niah-prompts: give one number or one per length ({len(lengths)})")
    prompts = dict(zip(lengths, prompts * len(lengths) if len(prompts) == 1 else prompts))
    pairs = [_pair(p) for p in args.pairs.split(",") if p]
    results["niah"] = []
    laws_from = args.laws_from or args.niah_only
    if laws_from:
        saved_run = SavedRun.load(laws_from, args.fit_samples)
        results["laws_from"] = laws_from
        results["kl"] = []
        numbers = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
        variants = law_variants(numbers(args.site_weights), numbers(args.caps), numbers(args.exponents),
                                numbers(args.match), numbers(args.offsets))
        adjust = None
        if args.spare:
            adjust = lambda fits: fits._replace(  # noqa: E731
                site_laws=_spared(fits.site_laws, saved_run.passes, saved_run.trials, args.spare))
        writers = {name + (f" spare {args.spare}" if args.spare else ""): law_writer(sites, saved_run, cfg, adjust)
                   for name, cfg in variants.items()}
        results["law"] = ", ".join(writers)
        if args.laws_from and args.kl_length > 0 and pairs:
            with _timed(seconds, "kl"):
                for row in _kl_rows(model, sites, tokenizer, args, pairs, writers):
                    results["kl"].append(row)
                    save()
        first = next(iter(writers.values()))
        results["heldout"] = {}
        if args.laws_from_heldout:
            with _timed(seconds, "heldout"):
                for target, rows in _heldout_rows(model, sites, tokenizer, args, write_law=first):
                    results["heldout"][target] = rows
                    save()
        with _timed(seconds, "niah"):
            for row in _niah(model, tokenizer, sites, lengths, prompts, pairs, dense=args.niah_dense,
                             law_writers=writers if len(writers) > 1 else {"": first}):  # one law: rows unlabelled
                results["niah"].append(row)
                save()
        return

    cfg = _run_config(args)
    results["calibration_config"] = cfg.to_dict()
    with _timed(seconds, "calibration"):
        calibration = fxsparse.calibrate(model, cfg, tokenizer=tokenizer)
    results["calibration"] = calibration.to_dict()
    results["law"] = "per_site" if calibration.site_laws else "global"
    results["passes"] = [{"phase": p.phase, "sample": p.sample, "kv_len": p.kv_len, "valid": p.valid.tolist(),
                          "skipped": p.skipped.tolist()} for p in calibration.passes]
    logging.info("\n%s", calibration.format())
    save()

    # -- the calibrated laws next to the same calibration with other pooling weights (refitted from the same
    #    passes): held-out sparsity per target, KL vs dense and achieved sparsity on essay text per target pair --
    saved_run = SavedRun(calibration.passes, calibration.trials, cfg.target_sparse_ratio.to_dict())
    variants = {"calibrated": cfg,
                **law_variants([1.0, 0.0], [0.0], [cfg.fit_length_exponent], [cfg.match_length_bins],
                               [cfg.length_offsets])}
    writers = {name: law_writer(sites, saved_run, variant) for name, variant in variants.items()}
    results["heldout"] = {}
    with _timed(seconds, "heldout"):
        for target, rows in _heldout_rows(model, sites, tokenizer, args, calibration.heldout, writers["calibrated"]):
            results["heldout"][target] = rows
            save()

    results["kl"] = []
    if args.kl_length > 0 and pairs:
        with _timed(seconds, "kl"):
            for row in _kl_rows(model, sites, tokenizer, args, pairs, writers):
                results["kl"].append(row)
                save()

    with _timed(seconds, "niah"):  # the calibrated law, refitted at each pair as ``law_writer`` says
        for row in _niah(model, tokenizer, sites, lengths, prompts, pairs, law_writers={"": writers["calibrated"]}):
            results["niah"].append(row)
            save()
    results["total_s"] = time.perf_counter() - start
    results["graph_compiles"] = getattr(model, COMPILER_ATTRIBUTE).compiles
    save()


if __name__ == "__main__":
    main()
