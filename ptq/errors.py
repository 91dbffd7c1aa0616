"""The exceptions users see: a one-line message naming what is wrong and how to fix it, and a stop by signal."""

from __future__ import annotations

import signal


class PtqError(Exception):
    """A user-facing error; the CLI and entry points print its message as a single line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (timeout, systemd, docker stop, Slurm, a closed terminal): handled like Ctrl-C, so
    runs end KILLED with what they measured, temp files removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def stop_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into Terminated in this (main) thread."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_terminated)
