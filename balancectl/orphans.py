"""No orphans: a child process that ends when its parent does (Linux, ``PR_SET_PDEATHSIG``).

Two parents use it: a node's supervisor for its HTTP workers (SIGKILL: a worker has
nothing of its own to hand back), and the local launcher (``balancectl up``, ``demo``)
for its nodes, through ``LAUNCHER_PID`` in their environment (SIGTERM: the node stops as
on Ctrl-C, handing its leases back and recording that it left). The kernel sends the
signal when the parent's thread that started the child ends, so a parent must start its
children from a thread that lives as long as it does (both start them from their main
thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

PR_SET_PDEATHSIG = 1
# Set by the local launcher (toolkit.cluster) in each node's environment: its own pid.
LAUNCHER_PID = "BALANCECTL_LAUNCHER_PID"


def die_with_parent(parent_pid: int, signal_number: int = signal.SIGKILL) -> None:
    """Have the kernel send ``signal_number`` to this process when its parent ends; exit at
    once if the parent has ended already."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal_number)
    if os.getppid() != parent_pid:  # the parent ended before the line above ran
        os._exit(1)


def end_with_launcher(environ: Mapping[str, str]) -> None:
    """For a node its launcher started: SIGTERM when the launcher ends, even by kill -9."""
    launcher = environ.get(LAUNCHER_PID, "")
    if launcher.isdigit():
        die_with_parent(int(launcher), signal.SIGTERM)
