"""``nnpipe`` command line: check a params file, export its JSON schema.

    nnpipe check [params.yaml]     validate without running anything (exit 1 on problems)
    nnpipe schema [-o FILE]        JSON schema of params.yaml for editors
    nnpipe lr-range-test [--params params.yaml] [--data data/prepared] [--plot FILE]
                                   the learning-rate range test of params.yaml's pipeline on the
                                   prepared training rows: a plot and a suggested train.lr
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nnpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a params file without running anything")
    check.add_argument("params", nargs="?", default="params.yaml")
    schema = sub.add_parser("schema", help="print the JSON schema of params.yaml")
    schema.add_argument("-o", "--output", help="write to this file instead of stdout")
    lrt = sub.add_parser("lr-range-test", help="suggest train.lr for params.yaml's pipeline")
    lrt.add_argument("--params", default="params.yaml")
    lrt.add_argument("--data", default="data/prepared",
                     help="the prepare stage's folder (run `dvc repro prepare` first)")
    lrt.add_argument("--plot", default="plots/lr_range_test.png")
    lrt.add_argument("--num-iter", type=int, default=100)
    args = parser.parse_args(argv)

    from .config import ConfigError, json_schema, load_config

    if args.command == "lr-range-test":
        return _lr_range_test(args)

    if args.command == "check":
        try:
            load_config(args.params)
        except (ConfigError, FileNotFoundError) as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{args.params}: OK")
        return 0
    text = json.dumps(json_schema(), indent=2)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return 0


def _lr_range_test(args) -> int:
    from pathlib import Path

    from .config import ConfigError, load_config
    from .data import read_dataset
    from .lr_finder import lr_range_test

    try:
        cfg = load_config(args.params)
        ds = read_dataset(args.data)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    pipe = cfg.build_pipeline(ds.task, ds.input_shape, verbose=0)
    try:
        result = lr_range_test(pipe, ds.X_train, ds.y_train, num_iter=args.num_iter)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    result.plot(args.plot)
    print(result)
    print(f"suggested train.lr: {result.suggested_lr:.3g} (plot: {args.plot}); "
          f"params.yaml has {cfg.train.get('lr', 'the default')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
