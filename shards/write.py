"""Turn a dataset in its native layout into WebDataset shards.

    python -m shards.write digits --out data/digits
    python -m shards.write <dataset> --src DIR --out DIR [--shard-size 256MB] [--workers N]
                           [--on-bad-image {fail,skip}] [converter options]

Datasets: cifar100, inat2018, cub200, cars196, sop, inshop, sketchy, folder, digits;
``python -m shards.write <dataset> --help`` lists a converter's options, and
shards/README.md describes each native layout, its splits and its labels.

Interrupted writes resume: finished shards are kept, the rest is written again.
A bad image (missing, unreadable, truncated) stops the write, naming the file (exit
status 1), unless --on-bad-image skip leaves it out and lists it in the manifest.
Usage errors (a missing --src or annotation file) exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from shards.writer import BAD_IMAGE_POLICIES, DEFAULT_SHARD_BYTES, BadImageError, SettingsChanged, write_dataset

CONVERTERS = {
    "cars196": "shards.cars196",
    "cifar100": "shards.cifar100",
    "cub200": "shards.cub200",
    "digits": "shards.digits",
    "folder": "shards.folder",
    "inat2018": "shards.inat2018",
    "inshop": "shards.inshop",
    "sketchy": "shards.sketchy",
    "sop": "shards.sop",
}


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
    parser.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES, default="fail",
                        help="a missing, unreadable or truncated image: stop naming it (fail, the default), or "
                             "leave it out with a warning and list it in the manifest (skip)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a split already written with other settings (otherwise that is an error)")
    if converter in CONVERTERS:
        importlib.import_module(CONVERTERS[converter]).add_arguments(parser)
    return parser


GLOBAL_VALUED = ("--src", "--out", "--shard-size", "--workers", "--on-bad-image")


def dataset_argument(argv: list[str]) -> str | None:
    """The positional dataset name (the converter adds its own options to the parser)."""
    after_option = False
    for arg in argv:
        if not arg.startswith("-") and not after_option:
            return arg
        after_option = arg in GLOBAL_VALUED  # "--src DIR": DIR is not the dataset
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(dataset_argument(argv)).parse_args(argv)
    module = importlib.import_module(CONVERTERS[args.dataset])
    out = args.out or Path("data") / args.dataset
    try:
        sources = module.sources(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"shards.write: {err}", file=sys.stderr)
        return 2
    try:
        manifests = write_dataset(sources, out, dataset=module.NAME, converter_version=module.VERSION,
                                  shard_bytes=args.shard_size, workers=args.workers, progress=not args.no_progress,
                                  on_bad_image=args.on_bad_image, overwrite=args.overwrite)
    except BadImageError as err:
        print(f"shards.write: {err}", file=sys.stderr)
        return 1
    except SettingsChanged as err:
        print(f"shards.write: {err}", file=sys.stderr)
        return 2
    for m in manifests:
        skipped = f", {m['num_skipped']} bad images skipped" if m.get("num_skipped") else ""
        print(f"{out}/{m['split']}: {m['num_samples']} samples, {m['num_classes']} classes, "
              f"{len(m['shards'])} shards{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
