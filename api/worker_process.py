"""`loraplex up`'s training worker: a child process, restarted when it dies on its own.

A worker can die of things outside its control (killed by the kernel for memory, a broker
error celery deems unrecoverable). On a one-machine install nobody else would notice, and
jobs would wait `queued` forever; so `up` starts it again, with a growing pause while it
keeps dying, and says so in its log.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

from api.children import die_with_parent

log = logging.getLogger(__name__)
FIRST_DELAY, MAX_DELAY = 1.0, 60.0
STABLE_AFTER = 60.0  # up this long: the next death starts the pauses over


class WorkerProcess:
    def __init__(
        self, command: list[str], *, env: dict[str, str] | None = None, what: str = "training"
    ) -> None:
        self.command, self.env, self.what = command, env, what
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.proc = self._spawn()
        threading.Thread(target=self._watch, name="worker-watch", daemon=True).start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Spawned by the main thread or the watch thread, both as long-lived as `up`.
        proc = subprocess.Popen(
            self.command, env=self.env, start_new_session=True, preexec_fn=die_with_parent()
        )
        log.info("starting the %s worker (pid %d)", self.what, proc.pid)
        return proc

    def _watch(self) -> None:
        delay = FIRST_DELAY
        while True:
            started = time.monotonic()
            code = self.proc.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > STABLE_AFTER:
                delay = FIRST_DELAY
            log.error(
                "the %s worker exited (code %s); starting it again in %.0f s",
                self.what,
                code,
                delay,
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.proc = self._spawn()
            delay = min(delay * 2, MAX_DELAY)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a running job is checkpointed and handed back), then SIGKILL."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
