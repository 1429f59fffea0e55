#!/usr/bin/env python3
"""Check the configured symbols of one exchange against its live listing.

    scripts/check_symbols.py EXCHANGE [--config PATH]

Prints each configured symbol with its status (ok, unknown, inactive) and the
exchange's own name for it. Exit status 0 when all are ok, 1 otherwise, 2 on
a configuration error, 3 when the listing cannot be fetched. Run it before a
deploy.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
