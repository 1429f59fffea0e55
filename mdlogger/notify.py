"""systemd notifications (``Type=notify``): READY, RELOADING, WATCHDOG, STOPPING.

A datagram to the socket named by ``NOTIFY_SOCKET``; nothing when unset.
Written here rather than taken from a package: it is one sendto().
"""

from __future__ import annotations

import os
import socket


def systemd_notifier(env=os.environ):
    """A callable(text) that notifies systemd, or None outside systemd."""
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address.startswith("@"):
        address = "\0" + address[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)

    def notify(text: str) -> None:
        try:
            sock.sendto(text.encode(), address)
        except OSError:
            pass  # systemd gone or busy: never let notification break the loop

    return notify
