"""Waiting on descriptors with ``poll(2)``, never ``select(2)``.

``select.select`` cannot take a descriptor numbered 1024 or above (it raises
``ValueError``). The writer raises its descriptor limit and keeps thousands
of column files open, so any descriptor it (or a test process) opens later
may be above that line: every wait in the package goes through here.
"""

from __future__ import annotations

import select

_IN = select.POLLIN | select.POLLPRI
_DONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


def _wait(fds, events: int, timeout: float | None) -> list[int]:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, events)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return [fd for fd, _ in poller.poll(ms)]


def readable(fds, timeout: float | None = None) -> list[int]:
    """The descriptors of ``fds`` (ints or objects with ``fileno()``) ready to read, or at their end
    (hang-up, error): ``read`` will not block on them. Waits at most ``timeout`` s (None: for ever)."""
    return _wait(fds, _IN | _DONE, timeout)


def writable(fds, timeout: float | None = None) -> list[int]:
    """The descriptors of ``fds`` ready to write (or in error), waiting at most ``timeout`` s."""
    return _wait(fds, select.POLLOUT | _DONE, timeout)
