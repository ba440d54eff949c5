"""Signals of the processes tests start.

A test that sends Ctrl-C (SIGINT) to a command must start it as a terminal
would: with SIGINT at its default. A shell that starts a job in the
background (`cmd &`, `nohup`) leaves SIGINT ignored, children inherit that,
and Python then installs no KeyboardInterrupt handler: the command would
never see the Ctrl-C the test sends.
"""

from __future__ import annotations

import signal


def ctrl_c_as_typed() -> None:
    """`preexec_fn` for Popen: SIGINT at its default in the child, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
