"""What a configuration reload (SIGHUP) changes: a pure comparison of two settings objects.

The supervisor re-reads the configuration and asks :func:`plan_reload` what
to do; nothing here touches a process, so every rule is tested directly.

* Exchanges newly enabled are discovered and started; exchanges disabled have
  their shards stopped.
* An exchange whose symbols or shard limits changed (or whose REST settings
  changed) is discovered again and its shards recomputed so that shards whose
  symbols did not change keep their worker and connection
  (:func:`mdlogger.planning.reshard`).
* An exchange whose connection settings changed (endpoint, timeouts, reconnect
  delays) has every shard replaced.
* Only a per-symbol large-trade threshold changed: the analytics engine takes
  it, no shard is touched.
* In ``logger:``, the keys in :data:`LIVE_LOGGER_KEYS` apply at once; the
  others belong to processes and listeners that a reload does not restart
  (data path, health port, writer buffers...). Their new values are reported
  and ignored until the service is restarted, so one settings object stays
  true for every process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .settings import ExchangeSettings, Settings

LIVE_LOGGER_KEYS = frozenset({"heartbeat_timeout_secs", "stall_timeout_secs", "large_trade_notional",
                              "large_trade_median_multiple"})
ANALYTICS_KEYS = frozenset({"large_trade_notional"})
# Exchange keys that only decide which symbols go on which shard (or how they are listed).
SHARDING_KEYS = frozenset({"symbols", "max_connections", "symbols_per_connection", "rest_endpoint",
                           "rest_timeout_secs", "rest_retries"})


@dataclass
class ReloadPlan:
    settings: Settings  # what the service runs with from now on
    started: list[str] = field(default_factory=list)  # newly enabled exchanges
    stopped: list[str] = field(default_factory=list)  # disabled exchanges
    reshard: list[str] = field(default_factory=list)  # rediscover, keep unchanged shards
    replace: list[str] = field(default_factory=list)  # rediscover, replace every shard
    ignored: list[str] = field(default_factory=list)  # changed logger keys that need a service restart
    changes: list[str] = field(default_factory=list)  # every changed dotted key, for the log

    @property
    def empty(self) -> bool:
        return not self.changes


def changed_fields(old, new) -> list[str]:
    """Names of the dataclass fields whose values differ."""
    return [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    """Compare the running settings with freshly loaded ones."""
    logger_changes = changed_fields(old.logger, new.logger)
    ignored = [k for k in logger_changes if k not in LIVE_LOGGER_KEYS]
    live = {k: getattr(new.logger, k) for k in logger_changes if k in LIVE_LOGGER_KEYS}
    logger = dataclasses.replace(old.logger, **live)
    plan = ReloadPlan(settings=dataclasses.replace(new, logger=logger),
                      ignored=["logger." + k for k in ignored],
                      changes=["logger." + k for k in logger_changes])
    for xo in old.exchanges:
        _plan_exchange(plan, xo, new.exchange(xo.name))
    return plan


def _plan_exchange(plan: ReloadPlan, old: ExchangeSettings, new: ExchangeSettings) -> None:
    keys = changed_fields(old, new)
    plan.changes += ["exchanges.%s.%s" % (old.name, k) for k in keys]
    if not (old.enabled or new.enabled) or not keys:
        return
    if not new.enabled:
        plan.stopped.append(new.name)
    elif not old.enabled:
        plan.started.append(new.name)
    elif set(keys) <= ANALYTICS_KEYS:
        return
    elif set(keys) <= SHARDING_KEYS | ANALYTICS_KEYS:
        plan.reshard.append(new.name)
    else:
        plan.replace.append(new.name)
