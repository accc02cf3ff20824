"""`python -m gradwatch.store.migrations VERSION [--db URL] [--home DIR]`: migrate a store to a
schema version, up or down (e.g. back to 1 for an older gradwatch). Opening a store upgrades
it anyway; this is the way back. Errors: one line, exit 2 for bad arguments, 1 otherwise."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from gradwatch.store.engine import create_store_engine, default_url, migrate, where
from gradwatch.store.errors import StoreError
from gradwatch.store.schema import SCHEMA_VERSION

PROG = "python -m gradwatch.store.migrations"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, migrate, print `URL: schema version A -> B`; the exit status."""
    parser = _Parser(prog=PROG, description="Migrate a gradwatch store to a schema version, up or down.")
    parser.add_argument("version", type=int, help=f"schema version to migrate to (1 to {SCHEMA_VERSION})")
    parser.add_argument("--db", metavar="URL", default=os.environ.get("GRADWATCH_DB"),
                        help="store URL  [default: $GRADWATCH_DB or sqlite:///HOME/gradwatch.db]")
    parser.add_argument("--home", type=Path, help="gradwatch home  [default: $GRADWATCH_HOME or ~/.gradwatch]")
    args = parser.parse_args(argv)
    if not 1 <= args.version <= SCHEMA_VERSION:
        parser.error(f"no schema version {args.version}: this gradwatch knows versions 1 to {SCHEMA_VERSION}")
    url = args.db or default_url(args.home.expanduser() if args.home else None)
    try:
        engine = create_store_engine(url, create=False)
        try:
            before = migrate(engine, args.version)
        finally:
            engine.dispose()
    except StoreError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    print(f"{where(engine.url)}: schema version {before} -> {args.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
