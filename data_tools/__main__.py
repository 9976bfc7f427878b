"""`python -m data_tools <command>` (installed as `imagen-data`): build and check training shards.

Commands: make-shards, coco, synthetic, make-encoder, make-eval-models, precompute-embeddings, inspect,
verify, fid-stats.
Each prints a JSON summary last on stdout; `verify` exits 1 when anything is bad.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from data_tools import coco, fid_stats, inspect_shards, make_encoder, make_eval_models, make_shards, precompute, synthetic
from data_tools.common import print_summary


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="imagen-data", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = _with_defaults(sub.add_parser)
    make_shards.add_parser(sub)
    coco.add_parser(sub)
    synthetic.add_parser(sub)
    precompute.add_parser(sub)
    make_encoder.add_parser(sub)
    make_eval_models.add_parser(sub)
    inspect_shards.add_parsers(sub)
    fid_stats.add_parser(sub)
    return parser


def _with_defaults(add_parser):
    """Make every subcommand's --help show the defaults."""
    def add(*args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        return add_parser(*args, **kwargs)
    return add


def main(argv: Optional[list[str]] = None) -> int:
    """Run one command; returns the exit status (1 when `verify` finds a problem, or when
    `precompute-embeddings` could not read an input shard to its end)."""
    args = build_parser().parse_args(argv)
    summary = args.func(args)
    print_summary(summary)
    return 0 if summary.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
