"""``nnpipe`` command line: check a params file, export its JSON schema.

    nnpipe check [params.yaml]     validate without running anything (exit 1 on problems)
    nnpipe schema [-o FILE]        JSON schema of params.yaml for editors
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
    args = parser.parse_args(argv)

    from .config import ConfigError, json_schema, load_config

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


if __name__ == "__main__":
    sys.exit(main())
