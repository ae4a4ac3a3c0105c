"""Turn a dataset in its native layout into WebDataset shards.

    python -m shards.write digits --out data/digits
    python -m shards.write <dataset> --src DIR --out DIR [--shard-size 256MB] [--workers N]

Interrupted writes resume: finished shards are kept, the rest is written again.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from shards.writer import DEFAULT_SHARD_BYTES, write_dataset

CONVERTERS = {"digits": "shards.digits"}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use e.g. 256MB, 1GB or 500000")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def build_parser(converter: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shards.write", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(CONVERTERS), help="which native layout to convert")
    parser.add_argument("--src", type=Path, help="the dataset's root directory in its native layout")
    parser.add_argument("--out", type=Path, help="output directory (default: data/<dataset>)")
    parser.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_BYTES,
                        help="target bytes per shard (default 256MB)")
    parser.add_argument("--workers", type=int, default=1, help="processes that encode images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if converter in CONVERTERS:
        importlib.import_module(CONVERTERS[converter]).add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(first).parse_args(argv)
    module = importlib.import_module(CONVERTERS[args.dataset])
    out = args.out or Path("data") / args.dataset
    try:
        sources = module.sources(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"shards.write: {err}", file=sys.stderr)
        return 2
    manifests = write_dataset(sources, out, dataset=module.NAME, converter_version=module.VERSION,
                              shard_bytes=args.shard_size, workers=args.workers, progress=not args.no_progress)
    for m in manifests:
        print(f"{out}/{m['split']}: {m['num_samples']} samples, {m['num_classes']} classes, {len(m['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
