"""The exchange registry: an exchange is declared in its adapter module alone.

An adapter class (a subclass of :class:`mdlogger.exchanges.base.Exchange`)
that sets ``name`` in its own class body is registered under that name when
the class is created; a fake (a subclass of
:class:`mdlogger.fakes.base.FakeExchange`) that sets ``name`` is registered
as that exchange's fake the same way. Everything that needs the exchanges
asks here, never a list of its own: settings (the exchange list, each one's
default endpoints and settings, all declared by the adapter), the writer's
per-exchange counters, storage, seal and verify, the command line, the demo.

Where the classes come from:

* every module of the ``mdlogger.exchanges`` package, imported by the
  package itself;
* the modules named in the environment variable ``MDLOGGER_EXCHANGE_MODULES``
  (comma-separated importable names), imported by the package right after
  its own: an exchange kept outside the package (a test's toy exchange, a
  private one). Every process imports the package (the supervisor, the
  forkserver's workers and writer, the tools) and inherits the environment,
  so all of them know the same exchanges;
* every module of the ``mdlogger.fakes`` package, imported by that package
  the first time a fake is asked for (``mdlogger.fakes.fake_class``; the
  service itself never loads the fakes). This module imports neither
  package: they import it.

Names follow :func:`mdlogger.records.valid_exchange` (a-z, 0-9). Lists are in
name order.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from .. import records as rec
from ..errors import ConfigError

MODULES_ENV = "MDLOGGER_EXCHANGE_MODULES"

# What an adapter class must declare (class data; see mdlogger/exchanges/base.py).
REQUIRED = ("default_ws_endpoint", "default_rest_endpoint", "channels", "max_channels_per_connection",
            "connect_rate", "send_rate", "session_class", "history")

ADAPTERS: dict[str, type] = {}  # name -> adapter class, in registration order
FAKES: dict[str, type] = {}  # name -> fake exchange class


def _where(cls: type) -> str:
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def _register(book: dict, kind: str, cls: type) -> None:
    name = cls.__dict__["name"]
    if not rec.valid_exchange(name):
        raise ValueError("%s: exchange name %r: expected lowercase letters and digits, starting with a letter "
                         "(at most %d)" % (_where(cls), name, rec.EXCHANGE_NAME_MAX))
    old = book.get(name)
    if old is not None and old is not cls and _where(old) != _where(cls):  # the same class again: a reload
        raise ValueError("%s: the %s of exchange %r is %s already" % (_where(cls), kind, name, _where(old)))
    book[name] = cls


def register_adapter(cls: type) -> None:
    """Called for every adapter class that sets ``name`` (``Exchange.__init_subclass__``)."""
    missing = [attr for attr in REQUIRED if getattr(cls, attr, None) is None]
    if missing:
        raise TypeError("%s: an exchange adapter must declare %s" % (_where(cls), ", ".join(missing)))
    _register(ADAPTERS, "adapter", cls)


def register_fake(cls: type) -> None:
    """Called for every fake class that sets ``name`` (``FakeExchange.__init_subclass__``)."""
    _register(FAKES, "fake", cls)


def unregister(name: str) -> None:
    """Forget an exchange's adapter and fake (for tests that register a toy exchange in-process)."""
    ADAPTERS.pop(name, None)
    FAKES.pop(name, None)


def is_exchange(name) -> bool:
    """True for the name of a registered exchange (what may name an exchange's directory)."""
    return isinstance(name, str) and name in ADAPTERS


def exchange_names() -> tuple[str, ...]:
    """Every registered exchange, in name order."""
    return tuple(sorted(ADAPTERS))


def adapter_class(name: str) -> type:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError("no adapter for exchange %r" % (name,)) from None


def import_package(package: str, path) -> None:
    """Import every module of a package whose name does not start with ``_``, in name order."""
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module("%s.%s" % (package, info.name))


def import_extra_modules(env=None) -> list[str]:
    """Import the modules named in ``MDLOGGER_EXCHANGE_MODULES``; ConfigError when one cannot be
    imported or registers nothing. Returns their names."""
    env = os.environ if env is None else env
    names = [m.strip() for m in env.get(MODULES_ENV, "").split(",") if m.strip()]
    source = "environment variable %s" % MODULES_ENV
    for module in names:
        try:
            imported = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it is reported as one configuration line
            raise ConfigError(source, module, "cannot import it (%s: %s)" % (type(exc).__name__, exc)) from None
        if _initializing(imported):
            continue  # it is importing the adapters (imported first): its classes come after
        if not any(cls.__module__ == module or cls.__module__.startswith(module + ".")
                   for cls in (*ADAPTERS.values(), *FAKES.values())):
            raise ConfigError(source, module, "expected a module that defines an exchange adapter or fake, "
                                              "got one that registers neither")
    return names


def _initializing(module) -> bool:
    """True while a module's own import is still running (it imported this package first)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))
