#!/usr/bin/env python3
"""Check the configured symbols of one exchange against its live listing.

    scripts/check_symbols.py EXCHANGE [--config PATH]

Prints each configured symbol with its status (ok, unknown, inactive) and the
exchange's own name for it. Exit status 0 when all are ok, 1 otherwise, 2 on
a usage or configuration error (including no environment with mdlogger's
dependencies: under a bare ``python3`` it re-runs itself with the checkout's
``.venv``), 3 when the listing cannot be fetched. Run it before a deploy.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _in_the_installed_environment() -> None:
    """Run under the interpreter that has mdlogger's dependencies (``python3`` on the PATH may not).

    Tried in order: this interpreter, the checkout's ``.venv``, ``$VIRTUAL_ENV``. A missing
    environment is a usage error (exit 2), never mistaken for "some symbols are not ok" (exit 1).
    """
    try:
        import requests  # noqa: F401
        import yaml  # noqa: F401
        return
    except ImportError as exc:
        missing = exc.name
    for venv in (os.path.join(ROOT, ".venv"), os.environ.get("VIRTUAL_ENV", "")):
        python = os.path.join(venv, "bin", "python") if venv else ""
        if python and os.access(python, os.X_OK) and not os.environ.get("MDLOGGER_REEXEC"):
            os.environ["MDLOGGER_REEXEC"] = "1"  # once: a venv without the dependencies must not loop
            os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])
    print("check_symbols: %s is not installed for %s; run it with the service's environment, e.g. "
          ".venv/bin/python scripts/check_symbols.py" % (missing, sys.executable), file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    _in_the_installed_environment()

from mdlogger.rest import RestError  # noqa: E402
from mdlogger.settings import EXCHANGES, ConfigError, load_settings  # noqa: E402
from mdlogger.tools import check_symbols, discover  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exchange", choices=EXCHANGES)
    ap.add_argument("--config", default="etc/logger.yaml")
    args = ap.parse_args(argv)
    try:
        settings = load_settings(args.config, os.environ, None, check_resources=False)
    except ConfigError as exc:
        print("check_symbols: config error: %s" % exc, file=sys.stderr)
        return 2
    xs = settings.exchange(args.exchange)
    try:
        listed = discover(xs)
    except RestError as exc:
        print("check_symbols: cannot fetch the %s listing: %s" % (args.exchange, exc), file=sys.stderr)
        return 3
    return check_symbols(xs, listed, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
