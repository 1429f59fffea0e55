"""The writer's open tables: a cache of column files sized from the descriptor limit.

At start the writer raises its ``RLIMIT_NOFILE`` soft limit to the hard limit
(:func:`raise_nofile_limit`; the systemd unit sets ``LimitNOFILE=``) and keeps
up to ``(limit - reserve) // 8`` tables open (8 columns at most,
:func:`table_cache_size`), least recently used first out. A table pushed out
is closed without an fsync: its rows are in the OS already, and it is
remembered, to be fsynced at the next interval (by its descriptors if it is
open again by then, else by opening each column once for the fsync). So an
fsync costs one call per written file per interval, however often the file
was closed in between, and eviction costs a close; the promise of
``fsync_interval_secs`` holds for every table. Keeping evicted descriptors
open until the interval would hold on to exactly the descriptors eviction
must free. (The writer spreads the interval's fsync over a second: it asks
:meth:`TableCache.dirty` for the tables due and hands them to
:meth:`TableCache.sync_keys` a share at a time.) Should an open fail with EMFILE all the same, the cache shrinks
instead of failing. Evictions, reopenings, opens and fsyncs are counted in
the writer's stats (``/health``, ``/metrics``).
"""

from __future__ import annotations

import errno
import logging
import resource
from collections import OrderedDict
from typing import Callable

from . import records as rec
from .stats import Block
from .storage import TableFiles, TableKey, sync_closed_table

log = logging.getLogger("mdlogger.writer")  # runs in the writer: its log lines are the writer's

MIN_OPEN_TABLES = 32
FD_RESERVE = 512  # descriptors left for slot pipes, sockets, REST connections, the ledger, logs
COLUMNS_PER_TABLE = max(len(c) for c in rec.COLUMNS.values())
NOFILE_CEILING = 1 << 20  # when the hard limit is unlimited


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; returns the soft limit in force.

    An unlimited hard limit is taken as the kernel's ``fs.nr_open`` (or 2**20).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as fh:
                target = int(fh.read())
        except (OSError, ValueError):
            target = NOFILE_CEILING
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return NOFILE_CEILING if soft == resource.RLIM_INFINITY else soft


def table_cache_size(limit: int | None = None) -> int:
    """How many tables the writer keeps open under a descriptor limit (default: the current soft limit).

    Each table holds up to ``COLUMNS_PER_TABLE`` descriptors; ``FD_RESERVE``
    (a quarter of a small limit) stays free for everything else. Never fewer
    than ``MIN_OPEN_TABLES``: under a limit that small the writer still runs,
    and should an open fail with EMFILE it shrinks the cache (:meth:`TableCache.get`).
    """
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            limit = NOFILE_CEILING
    reserve = min(FD_RESERVE, limit // 4)
    return max(MIN_OPEN_TABLES, (limit - reserve) // COLUMNS_PER_TABLE)


class TableCache:
    """The open tables (module docstring): ``files`` in least-recently-used order, at most ``max_open``."""

    def __init__(self, data_path: str, stats: Block, max_open: int | None = None):
        self.data_path = data_path
        self.stats = stats
        self.files: OrderedDict[TableKey, TableFiles] = OrderedDict()
        self.max_open = max_open or table_cache_size()
        stats.set("table_cache", self.max_open)
        self.to_sync: set[TableKey] = set()  # closed with rows written since their last fsync
        self.evicted: set[TableKey] = set()  # pushed out of the cache, not opened again yet
        self._emfile_logged = False

    def __len__(self) -> int:
        return len(self.files)

    def get(self, key: TableKey) -> TableFiles:
        """The table's open files, opening them (and pushing out the least recently used) if need be."""
        files = self.files.get(key)
        if files is not None:
            self.files.move_to_end(key)
            return files
        while len(self.files) >= self.max_open:
            self._evict()
        return self._open(key)

    def _open(self, key: TableKey) -> TableFiles:
        try:
            files = TableFiles(self.data_path, key)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self.files:
                raise
            # Out of descriptors all the same (a limit lowered under us, a descriptor leak elsewhere):
            # a smaller cache beats a writer stuck on EMFILE.
            self.max_open = max(1, len(self.files) * 3 // 4)
            self.stats.set("table_cache", self.max_open)
            if not self._emfile_logged:
                self._emfile_logged = True
                log.warning("out of file descriptors with %d tables open (%s): keeping at most %d",
                            len(self.files), exc, self.max_open)
            while len(self.files) >= self.max_open:
                self._evict()
            files = TableFiles(self.data_path, key)
        self.stats.add("table_opens")
        if key in self.evicted:
            self.evicted.discard(key)
            self.stats.add("reopened_tables")
        self.files[key] = files
        return files

    def _evict(self) -> None:
        """Close the least recently used table (no fsync: see the module docstring)."""
        key, files = self.files.popitem(last=False)
        self._release(key, files)
        self.evicted.add(key)
        self.stats.add("evictions")

    def _release(self, key: TableKey, files: TableFiles) -> None:
        """Close a table; if rows were written since its last fsync, it is fsynced at the next interval."""
        if files.dirty:
            self.to_sync.add(key)
        files.close()

    def drop(self, key: TableKey) -> None:
        """Close a table if it is open (after a write error: it is opened afresh at the next try)."""
        files = self.files.pop(key, None)
        if files is not None:
            self._release(key, files)

    def close_days_but(self, keep: set[str], busy) -> None:
        """Close the tables of days not in ``keep`` (but those in ``busy``), and forget old evictions."""
        for key in [k for k in self.files if k.day not in keep and k not in busy]:
            self._release(key, self.files.pop(key))
        if any(k.day not in keep for k in self.evicted):
            self.evicted = {k for k in self.evicted if k.day in keep}

    def sync(self, which: Callable[[TableKey], bool], on_error: Callable[[TableKey, OSError], None],
             close: bool = False) -> None:
        """fsync the tables ``which(key)`` selects: open ones through their descriptors (closed after
        if ``close``), closed ones remembered in ``to_sync`` by opening their columns once. An fsync
        error of an open table goes to ``on_error`` (which may drop it)."""
        done = 0
        for key, files in list(self.files.items()):
            if not which(key):
                continue
            try:
                done += files.fsync(force=key in self.to_sync)
                self.to_sync.discard(key)
            except OSError as exc:
                self.to_sync.discard(key)  # (an fsync error is reported once: asking again proves nothing)
                on_error(key, exc)
                continue
            if close:
                del self.files[key]
                files.close()
        for key in [k for k in self.to_sync if which(k)]:
            self.to_sync.discard(key)
            try:
                done += sync_closed_table(self.data_path, key)
            except OSError as exc:
                self.stats.add("io_errors")
                log.error("cannot fsync %s/%s/%s %s: %s", key.exchange, key.symbol, key.table, key.day, exc)
        self.stats.add("fsyncs", done)

    def dirty(self) -> list[TableKey]:
        """Every table with rows written since its last fsync: open ones, then closed ones."""
        return [k for k, f in self.files.items() if f.dirty or k in self.to_sync] + [
            k for k in self.to_sync if k not in self.files]

    def sync_keys(self, keys, on_error: Callable[[TableKey, OSError], None]) -> None:
        """fsync the given tables if they still need it (open: by their descriptors; closed: by
        opening their columns once); one that needs nothing any more (fsynced or sealed since) is skipped."""
        done = 0
        for key in keys:
            files = self.files.get(key)
            try:
                if files is not None:
                    done += files.fsync(force=key in self.to_sync)
                elif key in self.to_sync:
                    done += sync_closed_table(self.data_path, key)
            except OSError as exc:
                if files is not None:
                    on_error(key, exc)
                else:
                    self.stats.add("io_errors")
                    log.error("cannot fsync %s/%s/%s %s: %s", key.exchange, key.symbol, key.table, key.day, exc)
            self.to_sync.discard(key)  # (an fsync error is reported once: asking again proves nothing)
        self.stats.add("fsyncs", done)

    def close_all(self) -> None:
        for files in self.files.values():
            files.close()
        self.files.clear()
