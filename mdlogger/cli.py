"""``mdlogger-supervisor``: run the service, look at what it captured, try it on fakes.

    mdlogger-supervisor [--config PATH] [--debug] [run [--exchanges a,b]]
    mdlogger-supervisor --version | -h
    mdlogger-supervisor dump EXCHANGE SYMBOL {MD|TRADES} YYYY-MM-DD
    mdlogger-supervisor gaps [--exchange X] YYYY-MM-DD   # the gap ledger of a day
    mdlogger-supervisor verify YYYY-MM-DD                # check a day's files (exit 1 on problems)
    mdlogger-supervisor demo            # the service on built-in simulated exchanges

``--config`` is accepted before or after the command; without it the file
is ``$MDLOGGER_CONFIG``, else ``etc/logger.yaml``, else
``/etc/mdlogger/logger.yaml``. ``run`` needs one of them and at least one
enabled exchange; the commands that read files (``dump``, ``gaps``,
``verify``) or ask one named exchange (``symbols``, ``test``) need neither.

Configuration errors print one line naming the file, the key and what was
expected, and exit with status 2 before any process is started.

Importing this module imports the exchange adapters, and with them the
modules named in ``MDLOGGER_EXCHANGE_MODULES`` (mdlogger/exchanges/registry.py),
before any setting is read and before the forkserver starts: the command's
choices of exchange are the registered ones, and every process started from
here (inheriting the environment) knows the same exchanges.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile

import click
import yaml

from . import __version__
from .settings import ConfigError, load_settings

EXIT_CONFIG = 2
DEFAULT_CONFIGS = ("etc/logger.yaml", "/etc/mdlogger/logger.yaml")


def _registered() -> tuple[tuple[str, ...], ConfigError | None]:
    """The registered exchanges, or the error of a module in MDLOGGER_EXCHANGE_MODULES (reported by ``main``)."""
    try:
        from .exchanges import exchange_names
    except ConfigError as exc:
        return (), exc
    return exchange_names(), None


EXCHANGES, _REGISTRY_ERROR = _registered()


def _config_path(path: str | None) -> str | None:
    """--config, else $MDLOGGER_CONFIG, else the first of DEFAULT_CONFIGS that exists, else None."""
    if path is not None:
        return path
    env = os.environ.get("MDLOGGER_CONFIG")
    if env:
        return env
    for candidate in DEFAULT_CONFIGS:
        if os.path.exists(candidate):
            return candidate
    return None


def _required_config_path(path: str | None) -> str:
    """:func:`_config_path`, or exit 2 saying where it looked."""
    found = _config_path(path)
    if found is None:
        looked = ", ".join(os.path.abspath(c) for c in DEFAULT_CONFIGS)
        click.echo("mdlogger-supervisor: no configuration file found (looked in %s); give --config PATH or set "
                   "MDLOGGER_CONFIG" % looked, err=True)
        sys.exit(EXIT_CONFIG)
    return found


def _set_config(ctx: click.Context, _param, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["config"] = value


def config_option(command):
    """``--config`` after the command name too (it wins over one given before)."""
    return click.option("--config", type=str, default=None, expose_value=False, callback=_set_config,
                        help="YAML configuration (may also come before the command).")(command)


def _fail_config(exc: Exception) -> None:
    click.echo("mdlogger-supervisor: config error: %s" % exc, err=True)
    sys.exit(EXIT_CONFIG)


def _exchange_overrides(exchanges: str | None) -> dict:
    if not exchanges:
        return {}
    wanted = [x.strip().lower() for x in exchanges.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in EXCHANGES]
    if unknown:
        raise ConfigError("command line", "--exchanges", "expected names among %s, got %r" % (", ".join(EXCHANGES), ",".join(unknown)))
    return {"exchanges.%s.enabled" % x: (x in wanted) for x in EXCHANGES}


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", type=str, default=None,
              help="YAML configuration (default: $MDLOGGER_CONFIG, else etc/logger.yaml, else /etc/mdlogger/logger.yaml).")
@click.option("--debug", is_flag=True, help="Log at debug level.")
@click.version_option(__version__, "--version", prog_name="mdlogger-supervisor", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, config: str | None, debug: bool) -> None:
    """mdlogger: capture exchange trades and tickers into columnar files.

    Without a command: run. `mdlogger-supervisor COMMAND -h` explains a command.
    """
    if _REGISTRY_ERROR is not None:
        _fail_config(_REGISTRY_ERROR)
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    ctx.obj["debug"] = debug
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@main.command()
@click.option("--exchanges", default=None, help="Comma-separated exchanges to run (others disabled).")
@click.option("--data-path", default=None, help="Override logger.data_path.")
@click.option("--health-port", type=int, default=None, help="Override logger.health_check_port.")
@config_option
@click.pass_context
def run(ctx: click.Context, exchanges: str | None, data_path: str | None, health_port: int | None) -> None:
    """Run the supervisor (the default command)."""
    try:
        overrides = _exchange_overrides(exchanges)
        if data_path is not None:
            overrides["logger.data_path"] = data_path
        if health_port is not None:
            overrides["logger.health_check_port"] = health_port
        path = _required_config_path(ctx.obj["config"])
        settings = load_settings(path, os.environ, overrides)
    except ConfigError as exc:
        _fail_config(exc)
    sys.exit(_run_supervisor(settings, ctx.obj["debug"], _reloader(path, os.environ, overrides)))


def _reloader(path: str | None, env, overrides: dict):
    """What SIGHUP runs: the same sources read again (the data path and port are in use by now, not checked)."""
    if path is None:
        return None
    return lambda: load_settings(path, env, overrides, check_resources=False)


def _run_supervisor(settings, debug: bool, reload_settings=None) -> int:
    from setproctitle import setproctitle

    from .logs import configure_root
    from .notify import systemd_notifier
    from .supervisor import Supervisor

    setproctitle("mdlogger: supervisor")  # what ps and top show (the children set their own)
    level = logging.DEBUG if debug else getattr(logging, settings.logger.log_level, logging.INFO)
    configure_root(level)
    supervisor = Supervisor(settings, log_level=level, reload_settings=reload_settings)
    supervisor.notify = systemd_notifier()
    return supervisor.run()


@main.command()
@click.argument("exchange", type=click.Choice(EXCHANGES))
@click.argument("symbol")
@click.argument("table", type=click.Choice(["MD", "TRADES"], case_sensitive=False))
@click.argument("day")
@click.option("--data-path", default=None, help="Data directory (default: logger.data_path of the config).")
@config_option
@click.pass_context
def dump(ctx: click.Context, exchange: str, symbol: str, table: str, day: str, data_path: str | None) -> None:
    """Print one table of one symbol and UTC day (YYYY-MM-DD) as CSV."""
    from .reader import dump_csv

    data_path = _data_path_only(ctx, data_path, "dump")
    try:
        dump_csv(data_path, exchange, symbol.upper(), table.upper(), day, sys.stdout)
    except (FileNotFoundError, ValueError) as exc:
        click.echo("mdlogger-supervisor dump: %s" % exc, err=True)
        sys.exit(1)


def _data_path_only(ctx: click.Context, data_path: str | None, command: str) -> str:
    """--data-path, else the configured logger.data_path, read without requiring the rest of the config to be valid."""
    if data_path is None:
        path = _config_path(ctx.obj["config"])
        try:
            data_path = load_settings(path, os.environ, None, check_resources=False,
                                      require_enabled=False).logger.data_path
        except ConfigError:
            data_path = _raw_data_path(path)
    if not os.path.isdir(data_path):
        click.echo("mdlogger-supervisor %s: no data directory %s" % (command, data_path), err=True)
        sys.exit(1)
    return data_path


def _raw_data_path(path: str | None) -> str:
    """logger.data_path from the environment, else the file, else the default (nothing else is checked)."""
    from .settings import LoggerSettings

    env = os.environ.get("LOGGER_DATA_PATH")
    if env:
        return os.path.abspath(env)
    value = None
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                doc = yaml.safe_load(fh)
        except (OSError, yaml.YAMLError) as exc:
            _fail_config(ConfigError(path, "logger.data_path", "cannot read the file (%s)" % exc))
        logger = doc.get("logger") if isinstance(doc, dict) else None
        value = logger.get("data_path") if isinstance(logger, dict) else None
        if value is not None and (not isinstance(value, str) or not value):
            _fail_config(ConfigError(path, "logger.data_path", "expected a non-empty string, got %r" % (value,)))
    return os.path.abspath(value or LoggerSettings.data_path)


def _day_argument(day: str) -> str:
    """``YYYY-MM-DD`` (2000..2099) -> ``DD.MM.YY``; BadParameter otherwise."""
    import datetime

    from .records import date_to_day_string

    try:
        if len(day) != 10:
            raise ValueError
        date = datetime.date.fromisoformat(day)
    except ValueError:
        raise click.BadParameter("expected a UTC day as YYYY-MM-DD, got %r" % (day,), param_hint="DAY") from None
    if not 2000 <= date.year <= 2099:
        raise click.BadParameter("expected a year in 2000..2099, got %r" % (day,), param_hint="DAY")
    return date_to_day_string(day)


def _aligned(rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """Rows of cells as lines with aligned columns (the last column is not padded)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        cells[-1] = r[-1]
        lines.append("  ".join(cells).rstrip())
    return lines


@main.command("gaps")
@click.argument("day")
@click.option("--data-path", default=None, help="Data directory (default: logger.data_path of the config).")
@click.option("--exchange", type=click.Choice(EXCHANGES), default=None, help="Only this exchange (default: all).")
@config_option
@click.pass_context
def gaps_cmd(ctx: click.Context, day: str, data_path: str | None, exchange: str | None) -> None:
    """Print the gap ledger of one UTC day (YYYY-MM-DD): each gap's latest state."""
    from .ledger import iso_nanos, read_gaps

    day_s = _day_argument(day)
    data_path = _data_path_only(ctx, data_path, "gaps")
    rows = [["exchange", "symbol", "from", "to", "why", "fate", "trades", "missing", "detail"]]

    def edge(g: dict, end: str) -> str:
        text = iso_nanos(g.get(end + "_sec") or 0, g.get(end + "_nanos") or 0)
        ident = g.get(end + "_id") or 0
        return "%s #%d" % (text, ident) if ident else text

    for name in ([exchange] if exchange else EXCHANGES):
        for g in read_gaps(data_path, name, day_s):
            missing = g.get("missing")
            rows.append([name, str(g.get("symbol", "")), edge(g, "from"), edge(g, "to"), str(g.get("why", "")),
                         str(g.get("fate", "")), str(g.get("trades", 0)), "-" if missing is None else str(missing),
                         str(g.get("detail") or "")])
    if len(rows) == 1:
        click.echo("no gaps recorded for %s%s" % (day, " on %s" % exchange if exchange else ""))
        return
    for line in _aligned(rows, right={6, 7}):
        click.echo(line)


@main.command("verify")
@click.argument("day")
@click.option("--data-path", default=None, help="Data directory (default: logger.data_path of the config).")
@config_option
@click.pass_context
def verify_cmd(ctx: click.Context, day: str, data_path: str | None) -> None:
    """Check every table of one UTC day (YYYY-MM-DD): whole rows, order, gaps in the ledger, the manifest."""
    from .verify import check_day, consecutive_ids_by_exchange

    day_s = _day_argument(day)
    data_path = _data_path_only(ctx, data_path, "verify")
    report = check_day(data_path, day_s, consecutive_ids_by_exchange())
    for line in report.problems:
        click.echo(line)
    if report.problems:
        sys.exit(1)
    if report.tables == 0:
        click.echo("mdlogger-supervisor verify: no tables for %s in %s" % (day, data_path), err=True)
        sys.exit(1)
    click.echo("ok: %d tables on %d exchanges checked" % (report.tables, report.exchanges))


def _exchange_settings(ctx: click.Context, exchange: str):
    try:
        settings = load_settings(_config_path(ctx.obj["config"]), os.environ, None, check_resources=False,
                                 require_enabled=False)
    except ConfigError as exc:
        _fail_config(exc)
    return settings.exchange(exchange)


@main.command()
@click.argument("exchange", type=click.Choice(EXCHANGES))
@config_option
@click.pass_context
def symbols(ctx: click.Context, exchange: str) -> None:
    """Discover and print an exchange's symbols."""
    from .rest import RestError
    from .tools import discover, print_symbols

    try:
        listed = discover(_exchange_settings(ctx, exchange))
    except RestError as exc:
        click.echo("mdlogger-supervisor symbols: %s" % exc, err=True)
        sys.exit(1)
    print_symbols(listed, sys.stdout)


@main.command("test")
@click.argument("exchange", type=click.Choice(EXCHANGES))
@click.option("--symbols", "wanted", default=None, help="Comma-separated symbols (default: the first one or two configured).")
@click.option("--count", default=10, show_default=True, help="Records to print.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for them.")
@config_option
@click.pass_context
def test_feed_cmd(ctx: click.Context, exchange: str, wanted: str | None, count: int, timeout: float) -> None:
    """Connect, subscribe to one or two symbols and print the first parsed records."""
    from .exchanges import adapter_for
    from .planning import resolve_symbols
    from .rest import RestError
    from .tools import discover, test_feed

    xs = _exchange_settings(ctx, exchange)
    try:
        listed = discover(xs)
    except RestError as exc:
        click.echo("FAILED: cannot list symbols: %s" % exc, err=True)
        sys.exit(1)
    names = [n.strip() for n in wanted.split(",")] if wanted else list(xs.symbols[:2])
    chosen, problems = resolve_symbols(adapter_for(xs), listed, names)
    if problems or not chosen:
        click.echo("FAILED: symbols not tradable: %s" % (", ".join("%s (%s)" % p for p in problems) or "none"), err=True)
        sys.exit(1)
    sys.exit(test_feed(xs, chosen[:2], count, timeout, sys.stdout))


@main.command()
@click.option("--data-path", default="./mdlogger-demo-data", show_default=True)
@click.option("--health-port", type=int, default=8080, show_default=True)
@click.option("--rate", type=float, default=5.0, show_default=True, help="Trades per second per symbol.")
@click.option("--mode", type=click.Choice(["steady", "firehose"]), default="steady", show_default=True)
@click.option("--exchanges", default=None, help="Comma-separated simulated exchanges (default: all).")
@click.pass_context
def demo(ctx: click.Context, data_path: str, health_port: int, rate: float, mode: str, exchanges: str | None) -> None:
    """Run the service against built-in simulated exchanges on loopback."""
    from .fakes import fake_names

    simulated = fake_names()
    names = [x.strip() for x in exchanges.split(",")] if exchanges else list(simulated)
    unknown = [x for x in names if x not in simulated]
    if unknown:
        click.echo("mdlogger-supervisor demo: no simulated exchange named %s" % ", ".join(unknown), err=True)
        sys.exit(EXIT_CONFIG)
    fakes = {}
    path = None  # the demo's configuration file: removed however the demo ends (SIGHUP re-reads it meanwhile)
    try:
        for name in names:
            fakes[name] = start_fake(name, mode=mode, rate=rate)
        config = demo_config(fakes, data_path, health_port)
        fd, path = tempfile.mkstemp(suffix=".yaml", prefix="mdlogger-demo-")
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(config, fh)
        try:
            settings = load_settings(path, {}, None)
        except ConfigError as exc:
            _fail_config(exc)
        click.echo("demo: simulated %s on loopback; data in %s; try: curl -s 127.0.0.1:%d/health"
                   % (", ".join(names), os.path.abspath(data_path), health_port), err=True)
        code = _run_supervisor(settings, ctx.obj["debug"], _reloader(path, {}, {}))
    finally:
        for fake in fakes.values():
            fake.stop()
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    sys.exit(code)


def demo_config(fakes: dict, data_path: str, health_port: int) -> dict:
    """A configuration pointing every exchange at its fake (the fakes' own symbols)."""
    return {
        "logger": {"data_path": data_path, "health_check_port": health_port, "flush_interval_secs": 1.0},
        "exchanges": {
            name: {
                "enabled": True,
                "ws_endpoint": fake.ws_endpoint,
                "rest_endpoint": fake.rest_endpoint,
                "symbols": [],
                "symbols_per_connection": 3,
            }
            for name, fake in fakes.items()
        },
    }


class FakeProcess:
    """A fake exchange in its own process (python -m mdlogger.fakes)."""

    def __init__(self, exchange: str, args: list[str]):
        cmd = [sys.executable, "-m", "mdlogger.fakes", exchange, "--port", "0"] + args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if len(line) != 3 or line[0] != "READY":
            self.stop()
            raise RuntimeError("fake %s did not start (said %r)" % (exchange, line))
        self.port = int(line[1])
        self.ws_endpoint = "ws://127.0.0.1:%d%s" % (self.port, "" if line[2] == "/" else line[2])
        self.rest_endpoint = "http://127.0.0.1:%d" % self.port

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_fake(exchange: str, mode: str = "steady", rate: float = 5.0, extra: list[str] | None = None) -> FakeProcess:
    return FakeProcess(exchange, ["--mode", mode, "--rate", str(rate)] + list(extra or []))


if __name__ == "__main__":  # pragma: no cover
    main()
