"""Child processes that die with the process that started them, however it dies.

`up` and `serve` stop their children on a clean shutdown; a SIGKILL (the OOM killer, a
`kill -9`, a supervisor's timeout) skips that path, and a child in a session of its own then
runs on, orphaned: a worker hung in C code holding the GIL ignores every later SIGTERM and
spun at 90% CPU until killed by hand. Linux's parent-death signal is sent by the kernel, so
it needs nothing from the child. It fires when the *thread* that forked the child exits:
spawn only from threads that live as long as the children (the main thread, the event loop,
a supervisor's own thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
# Loaded in the parent: the function run between fork and exec must not load libraries.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel SIGKILL the child when its parent goes; None
    where the platform has no such signal (the clean shutdown path still stops children)."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def preexec() -> None:
        die_with(parent)

    return preexec


def die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when `parent` (the process that started it)
    goes; exit at once where it already has. Run in the child: between fork and exec
    (`die_with_parent`), or from inside children another library starts (the vLLM
    replica's engine and model processes: serving/vllm_plugin.py). Linux only."""
    if not sys.platform.startswith("linux"):
        return
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
