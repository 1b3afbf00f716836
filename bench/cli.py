"""What the bench scripts' command lines share: the parser, the device options, where results go."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"   # git-ignored: results, plots and the toy models


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose --help prints the script's docstring as written, and names the script
    as it is run (`python -m bench.run`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None else None
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_device_options(ap: argparse.ArgumentParser, device: str | None = "cpu", dtype: str | None = "float32",
                       device_default: str | None = None, dtype_default: str | None = None) -> None:
    """--device and --dtype; the *_default texts say what a None default resolves to."""
    ap.add_argument("--device", default=device, help=f"cpu | cuda (default: {device_default or device})")
    ap.add_argument("--dtype", default=dtype, help=f"float32 | bfloat16 (default: {dtype_default or dtype})")
