"""The one validated, frozen settings object.

Sources are applied in order, each overriding the one before:
built-in defaults < the YAML file < ``LOGGER_*`` environment variables < the
command line. Every value is checked against its key's type and bounds;
unknown keys are errors. A :class:`ConfigError` is one line naming the
source (file path, environment variable or command line), the dotted key and
what was expected.

The exchanges are the registered adapters (mdlogger/exchanges/registry.py);
each adapter declares its default endpoints and any other default of its
``exchanges.<name>`` section, checked here like a file's values.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError  # noqa: F401 - defined apart so the exchange registry can raise it



def exchange_names() -> tuple[str, ...]:
    """The registered exchanges, in name order (importing the adapters on first use)."""
    from .exchanges import exchange_names as registered  # here: the adapters import this module

    return registered()


def __getattr__(name: str):
    if name == "EXCHANGES":  # the registered names, read when asked (the older constant's name)
        return exchange_names()
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


@dataclass(frozen=True)
class ExchangeSettings:
    name: str
    enabled: bool = False
    ws_endpoint: str = ""
    rest_endpoint: str = ""
    max_connections: int = 5
    symbols_per_connection: int = 200
    reconnect_delay_secs: float = 1.0
    max_reconnect_delay_secs: float = 60.0
    symbols: tuple = ()
    large_trade_notional: tuple = ()  # ((symbol, notional), ...): per-symbol large-trade thresholds
    silence_timeout_secs: float = 30.0
    connect_timeout_secs: float = 10.0
    rest_timeout_secs: float = 10.0
    rest_retries: int = 3
    backfill_max_secs: float = 6 * 3600.0  # gaps that start longer ago are recorded as unrecoverable
    backfill_hold_secs: float = 120.0  # a symbol's rows after a gap wait at most this long for it to be filled


@dataclass(frozen=True)
class LoggerSettings:
    data_path: str = "./data"
    buffer_size: int = 1 << 20
    flush_interval_secs: float = 0.02
    health_check_port: int = 8080
    health_check_host: str = "127.0.0.1"
    heartbeat_timeout_secs: float = 30.0
    stall_timeout_secs: float = 60.0
    shutdown_timeout_secs: float = 10.0
    healthy_run_secs: float = 60.0
    restart_delay_secs: float = 1.0
    max_restart_delay_secs: float = 60.0
    fsync_interval_secs: float = 30.0
    batch_max_delay_ms: float = 5.0
    worker_buffer_bytes: int = 64 << 20
    log_level: str = "INFO"
    retention_days: int = 0  # 0: keep every day; else day files older than this are removed daily
    analytics_interval_secs: int = 60
    large_trade_notional: float = 0.0  # 0: off; a trade with price x size >= this is large
    large_trade_median_multiple: float = 0.0  # 0: off; a trade >= this x the recent median size is large
    seal_grace_secs: float = 600.0  # a UTC day is sealed this long after it ends
    file_mode: int = 0o640  # data files, ledger, manifests; directories get x where r is set (0750)


@dataclass(frozen=True)
class Settings:
    logger: LoggerSettings
    exchanges: tuple
    source: str = "<defaults>"

    def exchange(self, name: str) -> ExchangeSettings:
        for x in self.exchanges:
            if x.name == name:
                return x
        raise KeyError(name)

    def enabled_exchanges(self) -> tuple:
        return tuple(x for x in self.exchanges if x.enabled)


# ---------------------------------------------------------------------------
# Key rules: (kind, check) per key. Kinds: int, float, bool, str, list.

_POSITIVE = ("positive", lambda v: v > 0)
_NONNEG = ("non-negative", lambda v: v >= 0)
_PORT = ("port number 0..65535", lambda v: 0 <= v <= 65535)
_LEVEL = ("one of DEBUG, INFO, WARNING, ERROR", lambda v: v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"))
_NONEMPTY = ("non-empty", lambda v: bool(v.strip()))

LOGGER_RULES: dict[str, tuple[str, tuple | None]] = {
    "data_path": ("str", _NONEMPTY),
    "buffer_size": ("int", _POSITIVE),
    "flush_interval_secs": ("float", _POSITIVE),
    "health_check_port": ("int", _PORT),
    "health_check_host": ("str", _NONEMPTY),
    "heartbeat_timeout_secs": ("float", _POSITIVE),
    "stall_timeout_secs": ("float", _POSITIVE),
    "shutdown_timeout_secs": ("float", _POSITIVE),
    "healthy_run_secs": ("float", _POSITIVE),
    "restart_delay_secs": ("float", _POSITIVE),
    "max_restart_delay_secs": ("float", _POSITIVE),
    "fsync_interval_secs": ("float", _POSITIVE),
    "batch_max_delay_ms": ("float", _POSITIVE),
    "worker_buffer_bytes": ("int", _POSITIVE),
    "log_level": ("str", _LEVEL),
    "retention_days": ("int", _NONNEG),
    "analytics_interval_secs": ("int", _POSITIVE),
    "large_trade_notional": ("float", _NONNEG),
    "large_trade_median_multiple": ("float", _NONNEG),
    "seal_grace_secs": ("float", _NONNEG),
    "file_mode": ("file_mode", None),
}

EXCHANGE_RULES: dict[str, tuple[str, tuple | None]] = {
    "enabled": ("bool", None),
    "ws_endpoint": ("ws_url", None),
    "rest_endpoint": ("http_url", None),
    "max_connections": ("int", _POSITIVE),
    "symbols_per_connection": ("int", _POSITIVE),
    "reconnect_delay_secs": ("float", _POSITIVE),
    "max_reconnect_delay_secs": ("float", _POSITIVE),
    "symbols": ("list", None),
    "large_trade_notional": ("notional_map", None),
    "silence_timeout_secs": ("float", _POSITIVE),
    "connect_timeout_secs": ("float", _POSITIVE),
    "rest_timeout_secs": ("float", _POSITIVE),
    "rest_retries": ("int", _NONNEG),
    "backfill_max_secs": ("float", _NONNEG),
    "backfill_hold_secs": ("float", _POSITIVE),
}

_KIND_TEXT = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "list": "a list of symbol strings",
    "ws_url": "a ws:// or wss:// URL with a host",
    "http_url": "an http:// or https:// URL with a host",
    "notional_map": "a mapping of symbol to a positive notional",
    "file_mode": "a quoted octal file mode such as \"0640\" (owner rw; only r and w bits)",
}


def _expected(kind: str, check) -> str:
    text = _KIND_TEXT[kind]
    if check is not None:
        word = check[0]
        text = "a %s %s" % (word, text.split(" ", 1)[1]) if kind in ("int", "float") else "%s (%s)" % (text, word)
    return text


def _coerce(kind: str, value: Any, from_text: bool) -> Any:
    """The typed value, or raise ValueError. ``from_text``: an env var string."""
    if from_text:
        return _coerce_text(kind, value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError
        return value
    if kind in ("str", "ws_url", "http_url"):
        if not isinstance(value, str):
            raise ValueError
        if kind != "str":
            _check_url(kind, value)
        return value
    if kind == "list":
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s.strip() for s in value):
            raise ValueError
        return tuple(s.strip() for s in value)
    if kind == "file_mode":
        return _file_mode(value)
    if kind == "notional_map":
        if not isinstance(value, dict):
            raise ValueError
        out = []
        for symbol, notional in value.items():
            if not isinstance(symbol, str) or isinstance(notional, bool) or not isinstance(notional, (int, float)) \
                    or not notional > 0:
                raise ValueError
            out.append((symbol, float(notional)))
        return tuple(sorted(out))
    raise AssertionError(kind)


def _coerce_text(kind: str, text: str) -> Any:
    text = text.strip()
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "bool":
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError
    if kind == "list":
        return tuple(s.strip() for s in text.split(",") if s.strip())
    if kind == "notional_map":  # SYMBOL=NOTIONAL,SYMBOL=NOTIONAL
        pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
        return _coerce(kind, {k.strip(): float(v) for k, v in pairs}, False)
    return _coerce(kind, text, False)


def _file_mode(value: Any) -> int:
    """``"0640"`` (or ``"640"``, ``"0o640"``) -> 0o640; ValueError for anything else.

    Only text: YAML reads an unquoted 0640 as the integer 416 and 640 as 640,
    which cannot be told from each other, so an integer is refused.
    """
    from .storage import check_file_mode

    if not isinstance(value, str):
        raise ValueError
    text = value.strip()
    if text[:2] in ("0o", "0O"):
        text = text[2:]
    if not 3 <= len(text) <= 4 or not all(c in "01234567" for c in text):
        raise ValueError
    mode = int(text, 8)
    check_file_mode(mode)
    return mode


def _check_url(kind: str, value: str) -> None:
    parts = urlsplit(value)
    schemes = ("ws", "wss") if kind == "ws_url" else ("http", "https")
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError from None


def _apply(target: dict, rules: dict, key: str, value: Any, source: str, dotted: str, from_text: bool = False) -> None:
    if key not in rules:
        raise ConfigError(source, dotted, "unknown key (known: %s)" % ", ".join(sorted(rules)))
    kind, check = rules[key]
    try:
        typed = _coerce(kind, value, from_text)
    except (ValueError, TypeError):
        raise ConfigError(source, dotted, "expected %s, got %r" % (_expected(kind, check), value)) from None
    if check is not None and not check[1](typed):
        raise ConfigError(source, dotted, "expected %s, got %r" % (_expected(kind, check), value))
    target[key] = typed


# ---------------------------------------------------------------------------


def _read_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "(file)", "no such file") from None
    except OSError as exc:
        raise ConfigError(path, "(file)", "cannot read: %s" % exc.strerror) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "(file)", "expected UTF-8 text, got byte 0x%02x at offset %d"
                          % (exc.object[exc.start], exc.start)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = " at line %d" % (mark.line + 1) if mark else ""
        raise ConfigError(path, "(file)", "invalid YAML%s: %s" % (where, getattr(exc, "problem", exc))) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(path, "(top level)", "expected a mapping with logger and exchanges, got %r" % type(doc).__name__)
    return doc


def _apply_file(doc: dict, path: str, logger: dict, exchanges: dict) -> None:
    for top, section in doc.items():
        if top == "logger":
            if section is None:
                continue
            if not isinstance(section, dict):
                raise ConfigError(path, "logger", "expected a mapping, got %r" % (section,))
            for key, value in section.items():
                _apply(logger, LOGGER_RULES, str(key), value, path, "logger.%s" % key)
        elif top == "exchanges":
            if section is None:
                continue
            if not isinstance(section, dict):
                raise ConfigError(path, "exchanges", "expected a mapping of exchange names, got %r" % (section,))
            for name, body in section.items():
                if name not in exchanges:
                    raise ConfigError(path, "exchanges.%s" % name, "unknown exchange (known: %s)" % ", ".join(exchanges))
                if body is None:
                    continue
                if not isinstance(body, dict):
                    raise ConfigError(path, "exchanges.%s" % name, "expected a mapping, got %r" % (body,))
                for key, value in body.items():
                    _apply(exchanges[name], EXCHANGE_RULES, str(key), value, path, "exchanges.%s.%s" % (name, key))
        else:
            raise ConfigError(path, str(top), "unknown key (known: exchanges, logger)")


def _apply_env(env: Mapping[str, str], logger: dict, exchanges: dict) -> None:
    for var in sorted(env):
        if not var.startswith("LOGGER_"):
            continue
        value = env[var]
        source = "environment variable %s" % var
        rest = var[len("LOGGER_"):]
        if rest.startswith("EXCHANGES_"):
            tail = rest[len("EXCHANGES_"):]
            name, _, key = tail.partition("_")
            name, key = name.lower(), key.lower()
            if name not in exchanges:
                raise ConfigError(source, "exchanges.%s" % name, "unknown exchange (known: %s)" % ", ".join(exchanges))
            _apply(exchanges[name], EXCHANGE_RULES, key, value, source, "exchanges.%s.%s" % (name, key), True)
        else:
            key = rest.lower()
            _apply(logger, LOGGER_RULES, key, value, source, "logger.%s" % key, True)


def _apply_overrides(overrides: Mapping[str, Any], logger: dict, exchanges: dict) -> None:
    source = "command line"
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if len(parts) == 2 and parts[0] == "logger":
            _apply(logger, LOGGER_RULES, parts[1], value, source, dotted)
        elif len(parts) == 3 and parts[0] == "exchanges" and parts[1] in exchanges:
            _apply(exchanges[parts[1]], EXCHANGE_RULES, parts[2], value, source, dotted)
        else:
            raise ConfigError(source, dotted, "unknown key")


def _defaults() -> tuple[dict, dict]:
    """The built-in logger values (none: the dataclass defaults) and, per registered exchange in name
    order, what its adapter declares: endpoints, then its other defaults."""
    from .exchanges import adapter_class

    exchanges = {}
    for name in exchange_names():
        cls = adapter_class(name)
        source = "adapter %s.%s" % (cls.__module__, cls.__qualname__)
        body = exchanges[name] = {}
        declared = {"ws_endpoint": cls.default_ws_endpoint, "rest_endpoint": cls.default_rest_endpoint}
        declared.update(cls.default_settings)
        for key, value in declared.items():
            _apply(body, EXCHANGE_RULES, key, value, source, "exchanges.%s.%s" % (name, key))
    return {}, exchanges


def _check_relations(settings: Settings, origin: dict) -> None:
    lg = settings.logger
    if lg.max_restart_delay_secs < lg.restart_delay_secs:
        raise ConfigError(origin.get("logger.max_restart_delay_secs", settings.source), "logger.max_restart_delay_secs",
                          "expected at least restart_delay_secs (%r), got %r" % (lg.restart_delay_secs, lg.max_restart_delay_secs))
    for x in settings.exchanges:
        if x.max_reconnect_delay_secs < x.reconnect_delay_secs:
            key = "exchanges.%s.max_reconnect_delay_secs" % x.name
            raise ConfigError(origin.get(key, settings.source), key,
                              "expected at least reconnect_delay_secs (%r), got %r" % (x.reconnect_delay_secs, x.max_reconnect_delay_secs))


def _check_enabled(settings: Settings) -> None:
    if not settings.enabled_exchanges():
        raise ConfigError(settings.source, "exchanges", "expected at least one exchange with enabled: true, got none")


def _check_resources(settings: Settings, origin: dict) -> None:
    lg = settings.logger
    src = origin.get("logger.data_path", settings.source)
    try:
        _make_data_dir(lg.data_path, lg.file_mode)
        with tempfile.NamedTemporaryFile(dir=lg.data_path, prefix=".mdlogger-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(src, "logger.data_path", "expected a writable directory, got %r (%s)" % (lg.data_path, exc.strerror or exc)) from None
    if lg.health_check_port:
        sock = socket.socket(socket.AF_INET6 if ":" in lg.health_check_host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((lg.health_check_host, lg.health_check_port))
        except OSError as exc:
            raise ConfigError(origin.get("logger.health_check_port", settings.source), "logger.health_check_port",
                              "port %d on %s is in use or cannot be bound (%s)" % (lg.health_check_port, lg.health_check_host, exc.strerror or exc)) from None
        finally:
            sock.close()


def _make_data_dir(path: str, file_mode: int) -> None:
    """The data directory, if missing, with the directory mode of ``file_mode`` (existing ones are left alone)."""
    from .storage import dir_mode_for

    if os.path.isdir(path):
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.mkdir(path, dir_mode_for(file_mode))
    except FileExistsError:
        return
    os.chmod(path, dir_mode_for(file_mode))


def load_settings(path: str | None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None,
                  check_resources: bool = True, require_enabled: bool = True) -> Settings:
    """Build the validated settings from defaults, file, environment and command line.

    ``require_enabled``: at least one exchange must be enabled (what the service
    needs; commands that only read files or ask one named exchange do not).
    """
    env = os.environ if env is None else env
    logger, exchanges = _defaults()
    origin: dict[str, str] = {}
    source = path or "<defaults>"
    if path is not None:
        doc = _read_file(path)
        _apply_file(doc, path, logger, exchanges)
        origin.update(_origins_from_file(doc, path))
    _apply_env(env, logger, exchanges)
    origin.update(_origins_from_env(env))
    if overrides:
        _apply_overrides(overrides, logger, exchanges)
        origin.update({k: "command line" for k in overrides})
    if "data_path" in logger:
        logger["data_path"] = os.path.abspath(logger["data_path"])
    else:
        logger["data_path"] = os.path.abspath(LoggerSettings.data_path)
    if "log_level" in logger:
        logger["log_level"] = logger["log_level"].upper()
    settings = Settings(
        logger=LoggerSettings(**logger),
        exchanges=tuple(ExchangeSettings(name=name, **body) for name, body in exchanges.items()),
        source=source,
    )
    _check_relations(settings, origin)
    if require_enabled:
        _check_enabled(settings)
    if check_resources:
        _check_resources(settings, origin)
    return settings


def _origins_from_file(doc: dict, path: str) -> dict:
    out = {}
    for key in (doc.get("logger") or {}):
        out["logger.%s" % key] = path
    for name, body in (doc.get("exchanges") or {}).items():
        for key in (body or {}):
            out["exchanges.%s.%s" % (name, key)] = path
    return out


def _origins_from_env(env: Mapping[str, str]) -> dict:
    out = {}
    for var in env:
        if var.startswith("LOGGER_EXCHANGES_"):
            name, _, key = var[len("LOGGER_EXCHANGES_"):].partition("_")
            out["exchanges.%s.%s" % (name.lower(), key.lower())] = "environment variable %s" % var
        elif var.startswith("LOGGER_"):
            out["logger.%s" % var[len("LOGGER_"):].lower()] = "environment variable %s" % var
    return out


def settings_to_dict(settings: Settings) -> dict:
    return dataclasses.asdict(settings)
