"""``nnpipe`` command line: check a params file, export its JSON schema, and the tools around it.

    nnpipe check [params.yaml] [--data DIR]
                                   validate without running anything (exit 1 on problems):
                                   every problem at once, including what the data's shape
                                   decides (read cheaply from the data source, or from the
                                   prepare stage's folder DIR)
    nnpipe schema [-o FILE]        JSON schema of params.yaml for editors
    nnpipe lr-range-test [--params params.yaml] [--data data/prepared] [--plot FILE]
                                   the learning-rate range test of params.yaml's pipeline on the
                                   prepared training rows: a plot and a suggested train.lr
    nnpipe sync [--outbox DIR] [--uri URI]
                                   replay offline MLflow records (python -m nnpipe.tracking sync)

Expected errors (invalid parameters, a missing file, a bad value) print one message and exit 1;
``--debug`` (or ``NNPIPE_DEBUG=1``) also prints their traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import List, Optional

from .exceptions import EXPECTED_ERRORS, debug_requested

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .tracking import add_sync_arguments

    parser = argparse.ArgumentParser(prog="nnpipe", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    debug_help = "print the traceback of expected errors too (or set NNPIPE_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002
        p = sub.add_parser(name, help=help, description=help)
        # after the command too (nnpipe check --debug); SUPPRESS keeps `nnpipe --debug check`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=debug_help)
        return p

    check = command("check", "validate a params file without running anything")
    check.add_argument("params", nargs="?", default="params.yaml")
    check.add_argument("--data", default=None,
                       help="check against the prepare stage's folder (e.g. data/prepared) "
                            "instead of the shape read from params.yaml's data source")
    schema = command("schema", "print the JSON schema of params.yaml")
    schema.add_argument("-o", "--output", help="write to this file instead of stdout")
    lrt = command("lr-range-test", "suggest train.lr for params.yaml's pipeline")
    lrt.add_argument("--params", default="params.yaml")
    lrt.add_argument("--data", default="data/prepared",
                     help="the prepare stage's folder (run `dvc repro prepare` first)")
    lrt.add_argument("--plot", default="plots/lr_range_test.png")
    lrt.add_argument("--num-iter", type=int, default=100)
    add_sync_arguments(command("sync", "replay offline tracking records into MLflow (as "
                                       "`python -m nnpipe.tracking sync`)"))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one ``nnpipe`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    commands = {"check": _check, "schema": _schema, "lr-range-test": _lr_range_test,
                "sync": _sync}
    try:
        return commands[args.command](args)
    except EXPECTED_ERRORS as exc:
        debug = debug_requested(args.debug)
        if debug:
            traceback.print_exc()
        print(f"nnpipe {args.command}: {exc}", file=sys.stderr)
        if not debug:
            print("(--debug or NNPIPE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace) -> int:
    from .config import data_shape, load_config

    cfg = load_config(args.params, data=args.data if args.data is not None else True)
    shape = data_shape(cfg, args.data)
    against = f"; checked against {shape.describe()}" if shape is not None else \
        "; the data's shape was not checked (unknown until `dvc repro prepare`)"
    print(f"{args.params}: OK{against}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from .config import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return 0


def _sync(args: argparse.Namespace) -> int:
    from .tracking import sync_command

    return sync_command(args)


def _lr_range_test(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data import read_dataset
    from .lr_finder import lr_range_test

    cfg = load_config(args.params, data=args.data)
    ds = read_dataset(args.data)
    pipe = cfg.build_pipeline(ds.task, ds.input_shape, verbose=0)
    result = lr_range_test(pipe, ds.X_train, ds.y_train, num_iter=args.num_iter)
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    result.plot(args.plot)
    print(result)
    print(f"suggested train.lr: {result.suggested_lr:.3g} (plot: {args.plot}); "
          f"params.yaml has {cfg.train.get('lr', 'the default')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
