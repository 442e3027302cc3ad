"""The embedded broker: kombu's filesystem transport, made safe for two processes.

kombu writes a message file in place, and a consumer moves away any file whose name
matches the queue and decodes it. A consumer that gets there between the producer's
`open()` and `write()` (the API sending a job while a worker polls) reads an empty file,
and the JSONDecodeError is an "unrecoverable error" that stops the worker for good.

Here a message is written under a name no consumer matches and renamed into place, so a
consumer sees whole messages only; and a file that still cannot be decoded (left by a crash
or a full disk) is dropped with a warning instead of stopping the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

log = logging.getLogger(__name__)


class Channel(filesystem.Channel):
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # A leading dot: `name.partition('.')[2]` can never equal "<queue>.msg".
        partial = os.path.join(self.data_folder_out, f".partial-{uuid.uuid4()}")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    def _get(self, queue: Any) -> Any:  # type: ignore[override]
        while True:  # Empty, raised by kombu when no file is left, ends the loop
            try:
                return super()._get(queue)
            except ValueError:  # an unreadable message file: already moved out of the queue
                log.warning("dropped an unreadable message file from queue %s", queue)


class Transport(filesystem.Transport):
    Channel = Channel

    @property
    def default_connection_params(self) -> dict[str, Any]:
        # Folders have no host: kombu would warn "No hostname was supplied" on every connect.
        return {"port": self.default_port}


TRANSPORT = f"{__name__}:Transport"
