"""The embedded broker under concurrent producers and consumers, as `loraplex up` runs it:
the API process sends while the worker process polls the same folder."""

from __future__ import annotations

import multiprocessing
import queue as queue_lib
from pathlib import Path
from typing import Any

from kombu import Connection

from workers.broker_fs import TRANSPORT


def _options(folder: Path) -> dict[str, Any]:
    return {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "store_processed": False,
        "control_folder": str(folder.parent / "control"),
        "polling_interval": 0.001,
    }


def _produce(folder: str, n: int) -> None:
    with Connection(
        "filesystem://", transport=TRANSPORT, transport_options=_options(Path(folder))
    ) as c:
        q = c.SimpleQueue("jobs")
        for i in range(n):
            q.put({"i": i, "pad": "x" * 500_000})  # big: a long window mid-write
        q.close()


def test_a_consumer_racing_a_producer_process_gets_every_message_whole(tmp_path: Path) -> None:
    folder = tmp_path / "queue"
    folder.mkdir()
    n = 200
    producer = multiprocessing.get_context("spawn").Process(target=_produce, args=(str(folder), n))
    producer.start()
    got: list[int] = []
    with Connection("filesystem://", transport=TRANSPORT, transport_options=_options(folder)) as c:
        q = c.SimpleQueue("jobs")
        while len(got) < n:
            try:
                message = q.get(timeout=30)
            except queue_lib.Empty:
                break
            got.append(message.payload["i"])
            message.ack()
        q.close()
    producer.join(30)
    assert producer.exitcode == 0
    assert sorted(got) == list(range(n))


def test_an_unreadable_message_file_is_dropped_not_fatal(tmp_path: Path) -> None:
    folder = tmp_path / "queue"
    folder.mkdir()
    # A queue name of its own: kombu caches declared bindings per process.
    # Names starting "0": before any real one ({ms since boot}_...) in the consumer's order.
    (folder / "0_left-by-a-crash.other.msg").write_bytes(b"")
    (folder / "00_half-written.other.msg").write_bytes(b'{"body": "eyJ')
    with Connection("filesystem://", transport=TRANSPORT, transport_options=_options(folder)) as c:
        q = c.SimpleQueue("other")
        q.put({"i": 1})
        message = q.get(timeout=5)
        assert message.payload == {"i": 1}
        message.ack()
        q.close()
    assert [p.name for p in folder.iterdir()] == []
