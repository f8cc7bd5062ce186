"""`python -m eval.bench [PART ...] [-- part args]`: run benchmark parts (default: all) and print their tables."""

from __future__ import annotations

import argparse
import importlib
import sys

PARTS = ("moe", "dit", "train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.bench",
        description="Run mmzoo benchmarks. Every number is a ratio against a baseline measured in the same run.",
    )
    parser.add_argument("parts", nargs="*", help=f"parts to run, from {', '.join(PARTS)} (default: all)")
    parser.add_argument("--gpu", action="store_true", help="run the GPU variants (bf16, larger sizes) where a part has them")
    args, rest = parser.parse_known_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    for part in args.parts or PARTS:
        module = importlib.import_module(f"eval.bench.{part}")
        print(f"\n=== bench: {part} ===", flush=True)
        module.run([*rest, *(["--gpu"] if args.gpu else [])])
    return 0


if __name__ == "__main__":
    sys.exit(main())
