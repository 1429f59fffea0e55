"""etc/mdlogger.service: systemd accepts it, and its hardening scores "OK"."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(ROOT, "etc", "mdlogger.service")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def unit_copy(tmp_path) -> str:
    """The unit as shipped, its ExecStart pointed at this environment's mdlogger-supervisor."""
    exe = shutil.which("mdlogger-supervisor") or os.path.join(os.path.dirname(sys.executable), "mdlogger-supervisor")
    assert os.path.exists(exe), "install the project first (pip install .)"
    text = open(UNIT).read()
    assert "ExecStart=/usr/local/bin/mdlogger-supervisor --config /etc/mdlogger/logger.yaml" in text
    path = tmp_path / "mdlogger.service"
    path.write_text(text.replace("/usr/local/bin/mdlogger-supervisor", exe))
    return str(path)


def test_unit_verifies(tmp_path):
    proc = subprocess.run(["systemd-analyze", "verify", unit_copy(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "mdlogger.service" not in proc.stderr, proc.stderr


def test_unit_security_exposure_is_ok(tmp_path):
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", unit_copy(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for mdlogger.service: ([\d.]+) (\w+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0 and m.group(2) == "OK", m.group(0)


def test_unit_shape():
    text = open(UNIT).read()
    for line in ("Type=notify", "KillMode=mixed", "Restart=on-failure", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ReadWritePaths=/var/lib/mdlogger", "PrivateTmp=yes", "ProtectHome=yes",
                 "User=mdlogger", "WatchdogSec="):
        assert line in text, line
    stop = int(re.search(r"TimeoutStopSec=(\d+)", text).group(1))
    assert stop > 10  # longer than the default shutdown_timeout_secs, so the graceful path has time


def test_unit_lets_the_writer_keep_every_table_of_every_symbol_open():
    """8,000 tables (every symbol of all five exchanges), twice over (yesterday's and today's), fit the
    table cache the writer sizes from the limit the unit sets."""
    from mdlogger.tables import table_cache_size

    limit = int(re.search(r"^LimitNOFILE=(\d+)$", open(UNIT).read(), re.M).group(1))
    assert table_cache_size(limit) >= 2 * 8000
