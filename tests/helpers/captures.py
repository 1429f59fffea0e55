"""Read the recorded exchange traffic in tests/captures (format: captures/README.md)."""

from __future__ import annotations

import os
import re

CAPTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "captures")
_RECV = re.compile(r"^(\d+\.\d+): (.*)$")


def received_frames(name: str) -> list[tuple[float, str]]:
    """``(receive time, text frame)`` for every frame the server sent."""
    out = []
    with open(os.path.join(CAPTURES, name), encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            m = _RECV.match(line)
            if m:
                out.append((float(m.group(1)), m.group(2)))
    return out


def rest_body(name: str, url_part: str) -> str:
    """The body of the first REST response whose URL contains ``url_part``."""
    with open(os.path.join(CAPTURES, name), encoding="utf-8") as fh:
        for line in fh:
            if " -> " in line:
                url, rest = line.split(" -> ", 1)
                if url_part in url:
                    return rest.split(": ", 1)[1]
    raise KeyError(url_part)
