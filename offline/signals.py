"""SIGTERM and SIGHUP end a command the way Ctrl-C does.

``kill``, ``timeout``, ``docker stop``, Kubernetes and systemd send SIGTERM; a closed terminal sends SIGHUP. By
default either kills Python on the spot: no ``finally`` runs, so the ``.partial`` output, the activation scratch
and any vLLM engine processes stay behind. Inside :func:`terminate_on` the first of them (or Ctrl-C) raises
:class:`Terminated` in the main thread instead, so the clean-up of an exception runs; the command then exits
with :func:`exit_status` (128 + the signal number, what shells report). A second one ends the process at once
(the signal's default action), as a second Ctrl-C is expected to. A signal the process was started ignoring
(``nohup`` ignores SIGHUP, a background job of a script SIGINT) stays ignored.

:class:`Terminated` is a ``BaseException`` but not a ``KeyboardInterrupt``, and Ctrl-C raises it too: library
code that catches ``KeyboardInterrupt`` and carries on (vLLM 0.32's ``zmq_socket_ctx`` does, while an engine
starts) would otherwise swallow it and the run would go on.

Only the CLI's ``main()`` installs the handlers, for as long as the command runs; importing this does nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Terminated(BaseException):
    """The run was asked to stop by ``signum`` (SIGTERM, SIGHUP, SIGINT)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _signum(e: KeyboardInterrupt | Terminated) -> int:
    return e.signum if isinstance(e, Terminated) else signal.SIGINT


def signal_name(e: KeyboardInterrupt | Terminated) -> str:
    return "Ctrl-C (SIGINT)" if _signum(e) == signal.SIGINT else signal.Signals(_signum(e)).name


def exit_status(e: KeyboardInterrupt | Terminated) -> int:
    """128 + the signal's number: 143 for SIGTERM, 129 for SIGHUP, 130 for Ctrl-C."""
    return 128 + _signum(e)


@contextmanager
def terminate_on(signals: tuple[int, ...] = SIGNALS):
    """While inside, the first of ``signals`` raises :class:`Terminated` in the main thread; a second one ends the
    process at once. Signals ignored on entry stay ignored; the previous handlers are back on exit. Outside the
    main thread (where Python cannot take signals) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner, fired = os.getpid(), []

    def handler(signum, frame):
        if os.getpid() != owner or fired:  # a forked child that inherited this handler, or a second signal
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        fired.append(signum)
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
