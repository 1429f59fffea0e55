"""What the benchmark scripts share: the service as a process tree, its processes by role, rows on disk.

Public tools only: ``psutil`` for CPU times and PSS, ``resource`` for a
client's own CPU, files on disk for the rows landed (counted from the column
files' sizes, docs/FORMAT.md, so the count does not depend on the writer's
code), and the service's own ``/health`` and ``/metrics`` for which process
is which and for the writer's counters.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import psutil
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mdlogger import records as rec  # noqa: E402

_DAY_FILE = re.compile(r"^([a-z_]+)\.(\d\d\.\d\d\.\d\d)\.bin$")
_WIDTHS = {c.name: struct.calcsize("<" + c.code) for c in rec.TRADE_COLUMNS}


def machine_line() -> str:
    """The machine line of docs/BENCHMARKS.md: architecture, cores, memory, CPU model, Python."""
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / (1 << 30)
    return "machine: %s, %d cores%s, %.0f GiB, Python %s, %s" % (
        os.uname().machine, os.cpu_count() or 0, " (%s)" % model if model else "", mem, sys.version.split()[0],
        time.strftime("%Y-%m-%d", time.gmtime()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trade_rows_by_table(data_path: str) -> dict[tuple[str, str, str], int]:
    """``{(exchange, symbol, day): whole rows}`` of every TRADES table: the smallest column file's row count."""
    out: dict[tuple[str, str, str], int] = {}
    try:
        exchanges = os.listdir(data_path)
    except FileNotFoundError:
        return out
    for exchange in exchanges:
        xdir = os.path.join(data_path, exchange)
        if not os.path.isdir(xdir):
            continue
        for symbol in os.listdir(xdir):
            tdir = os.path.join(xdir, symbol, "TRADES")
            try:
                entries = list(os.scandir(tdir))
            except (FileNotFoundError, NotADirectoryError):
                continue
            per_day: dict[str, dict[str, int]] = {}
            for entry in entries:
                m = _DAY_FILE.match(entry.name)
                if m and m.group(1) in _WIDTHS:
                    try:
                        per_day.setdefault(m.group(2), {})[m.group(1)] = entry.stat().st_size // _WIDTHS[m.group(1)]
                    except FileNotFoundError:
                        continue
            for day, cols in per_day.items():
                out[(exchange, symbol, day)] = min(cols.values()) if len(cols) == len(_WIDTHS) else 0
    return out


def trades_on_disk(data_path: str) -> int:
    """Whole TRADES rows in the files, every table, every day."""
    return sum(trade_rows_by_table(data_path).values())


def http_get(port: int, path: str, timeout: float = 5.0) -> bytes:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:  # /health answers 503 when degraded, with the document
        return exc.read()


def health(port: int) -> dict:
    return json.loads(http_get(port, "/health"))


_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def metrics(port: int, prefix: str = "mdlogger_writer_") -> dict[str, float]:
    """The samples of ``/metrics`` whose names start with ``prefix``: ``{name{labels}: value}``."""
    out = {}
    for line in http_get(port, "/metrics").decode().splitlines():
        m = _METRIC.match(line)
        if m and m.group(1).startswith(prefix):
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                continue
    return out


class Service:
    """``python -m mdlogger --config FILE run`` in its own session, with a temporary data directory.

    ``config`` is the document without ``logger.data_path`` / ``logger.health_check_port``, which are filled in.
    """

    def __init__(self, config: dict, prefix: str = "mdlogger-bench-"):
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        config = dict(config)
        config["logger"] = dict(config.get("logger", {}), data_path=self.data, health_check_port=self.port)
        self.config_path = os.path.join(self.dir, "logger.yaml")
        with open(self.config_path, "w") as fh:
            yaml.safe_dump(config, fh)
        self.log_path = os.path.join(self.dir, "service.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mdlogger", "--config", self.config_path, "run"],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.roles: dict[int, str] = {}

    def health(self) -> dict | None:
        try:
            return health(self.port)
        except (OSError, ValueError):
            return None

    def wait_healthy(self, timeout: float, every_shard: bool = True) -> dict:
        """Wait until /health says ok (and, with ``every_shard``, every shard receives); the document."""
        deadline = time.monotonic() + timeout
        doc = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the service exited (%s); its log: %s" % (self.proc.returncode, self.log_path))
            doc = self.health()
            if doc and doc.get("status") == "ok" and doc.get("shards") and (
                    not every_shard or all(s["receiving"] for s in doc["shards"])):
                return doc
            time.sleep(0.2)
        raise TimeoutError("the service was not healthy within %.0f s; last /health: %s"
                           % (timeout, json.dumps(doc)[:2000] if doc else None))

    def learn_roles(self, doc: dict | None = None) -> dict[int, str]:
        """Name the tree's processes: supervisor, writer, worker <exchange>#<shard>, other (forkserver...)."""
        doc = doc or self.health() or {}
        roles = {self.proc.pid: "supervisor"}
        if doc.get("writer", {}).get("pid"):
            roles[doc["writer"]["pid"]] = "writer"
        for s in doc.get("shards", []):
            if s.get("pid"):
                roles[s["pid"]] = "worker %s#%d" % (s["exchange"], s["shard"])
        self.roles = roles
        return roles

    def role(self, proc: psutil.Process) -> str:
        if proc.pid in self.roles:
            return self.roles[proc.pid]
        try:
            cmd = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            cmd = ""
        for word in ("forkserver", "resource_tracker"):
            if word in cmd:
                return word
        return "other"

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def cpu(self) -> dict[int, tuple[str, float]]:
        """``{pid: (role, CPU seconds)}`` of every process of the tree, user + system, reaped children included."""
        out = {}
        for p in self.tree():
            try:
                t = p.cpu_times()
                out[p.pid] = (self.role(p), t.user + t.system + t.children_user + t.children_system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def pss(self) -> dict[int, tuple[str, int]]:
        """``{pid: (role, PSS bytes)}`` of every process of the tree."""
        out = {}
        for p in self.tree():
            try:
                out[p.pid] = (self.role(p), p.memory_full_info().pss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def pid_of(self, role: str) -> int | None:
        return next((pid for pid, r in self.roles.items() if r == role), None)

    def stop(self, keep: bool = False) -> None:
        """SIGTERM, wait (SIGKILL the session after 60 s); remove the directory unless ``keep``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        if not keep:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)


def by_role(samples: dict[int, tuple[str, float]], group_workers: bool = False) -> dict[str, float]:
    """Sum per-process figures by role; with ``group_workers`` the shards of one exchange are one line."""
    out: dict[str, float] = {}
    for role, value in samples.values():
        if group_workers and role.startswith("worker "):
            role = role.split("#")[0]
        out[role] = out.get(role, 0) + value
    return out


def delta(after: dict[int, tuple[str, float]], before: dict[int, tuple[str, float]]) -> dict[int, tuple[str, float]]:
    """Per process, ``after - before`` (a process absent before counts from zero)."""
    return {pid: (role, v - before.get(pid, (role, 0.0))[1]) for pid, (role, v) in after.items()}


def role_order(role: str) -> tuple:
    order = {"supervisor": 0, "forkserver": 1, "resource_tracker": 2, "writer": 3}
    return (order.get(role, 4 if role.startswith("worker") else 5), role)
