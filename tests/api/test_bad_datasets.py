"""A corpus of malformed datasets (encodings, types, structures, sizes), all written here.

Each file goes through the files API and through the trainer's reader: both must name the
precise problem, and neither may crash. A seeded mutation fuzz then flips, cuts and splices
bytes of a good file: every variant is either processed or refused line by line, never a 500.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import random
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.settings import Settings
from tests.api.test_files import GOOD, chat, jsonl, upload
from tests.conftest import new_tenant
from trainer.formats import DatasetError, DatasetScanner, read_examples

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # validation is DB-blind

ONE = json.dumps(chat("What is widget 1?", "A gear."))


def _zip(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("train.jsonl", data)
    return out.getvalue()


def line(obj: object) -> bytes:
    return GOOD + json.dumps(obj).encode() + b"\n"


def msgs(*messages: dict) -> dict:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "q"}
CORPUS: dict[str, tuple[bytes, str]] = {
    # Encodings
    "utf16-bom": (GOOD.decode().encode("utf-16"), "file is UTF-16 or UTF-32"),
    "utf16-be-bom": (b"\xfe\xff" + GOOD.decode().encode("utf-16-be"), "file is UTF-16 (big"),
    "utf16-no-bom": (GOOD.decode().encode("utf-16-le"), "UTF-16 without a byte-order mark"),
    "utf32-bom": (GOOD.decode().encode("utf-32"), "file is UTF-16 or UTF-32"),
    "latin1": (
        GOOD + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"),
        "line 13: invalid UTF-8 at byte 15",
    ),
    "overlong-utf8": (
        GOOD + b'{"prompt": "\xc0\xaf", "completion": "x"}\n',
        "line 13: invalid UTF-8",
    ),
    "lone-surrogate": (
        GOOD + b'{"prompt": "ab\\ud800", "completion": "x"}\n',
        "line 13: prompt is not valid Unicode: lone surrogate",
    ),
    "gzip": (gzip.compress(GOOD), "file is gzip-compressed"),
    "bzip2": (bz2.compress(GOOD), "file is bzip2-compressed"),
    "zip": (_zip(GOOD), "file is a zip archive"),
    "pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "file is a PDF"),
    "nul-bytes": (GOOD + b"\x00\x00\x00\n", "line 13: invalid JSON"),
    # Types
    "content-list": (
        line(msgs(USER, {"role": "assistant", "content": ["a"]})),
        "line 13: messages[1].content must be a string, got list",
    ),
    "content-null": (
        line(msgs(USER, {"role": "assistant", "content": None})),
        "line 13: messages[1].content must be a string, got NoneType",
    ),
    "role-int": (line(msgs({"role": 1, "content": "q"})), "line 13: messages[0].role must be"),
    "weight-true": (
        line(msgs(USER, {"role": "assistant", "content": "a", "weight": True})),
        "line 13: messages[1].weight must be 0 or 1, got True",
    ),
    "weight-string": (
        line(msgs(USER, {"role": "assistant", "content": "a", "weight": "1"})),
        "line 13: messages[1].weight must be 0 or 1, got '1'",
    ),
    "completion-nan": (
        GOOD + b'{"prompt": "q", "completion": NaN}\n',
        "line 13: completion must be a string, got float",
    ),
    "prompt-number": (line({"prompt": 3, "completion": "x"}), "line 13: prompt must be a string"),
    "instruction-input-list": (
        line({"instruction": "do", "input": [1], "output": "x"}),
        "line 13: input must be a string, got list",
    ),
    "messages-object": (line({"messages": {"role": "user"}}), "line 13: messages must be a list"),
    "message-string": (line({"messages": ["hi"]}), "line 13: messages[0] must be an object"),
    "whitespace-prompt": (line({"prompt": "  \t", "completion": "x"}), "prompt must not be empty"),
    "huge-integer": (
        GOOD + b'{"prompt": "q", "completion": "a", "n": ' + b"9" * 5000 + b"}\n",
        "line 13: invalid JSON: Exceeds the limit (4300 digits)",
    ),
    # Structures
    "top-level-null": (GOOD + b"null\n", "line 13: expected a JSON object, got NoneType"),
    "top-level-string": (GOOD + b'"hello"\n', "line 13: expected a JSON object, got str"),
    "top-level-number": (GOOD + b"42\n", "line 13: expected a JSON object, got int"),
    "json-document": (
        json.dumps([chat("q", "a")] * 12, indent=2).encode(),
        "line 1: invalid JSON: a line holding only '['; this looks like pretty-printed JSON",
    ),
    "deeply-nested": (
        GOOD + b"[" * 100_000 + b"]" * 100_000 + b"\n",
        "line 13: invalid JSON: nested too deeply",
    ),
    "two-objects-one-line": (
        GOOD + (ONE + ONE).encode() + b"\n",
        "line 13: invalid JSON: Extra data",
    ),
    "cr-only-newlines": (
        jsonl([chat("q", "a")] * 12, sep="\r"),
        "line 1: invalid JSON: Extra data",
    ),
    "unknown-message-key": (
        line(msgs(USER, {"role": "assistant", "content": None, "tool_calls": []})),
        "line 13: messages[1] has unknown key(s): tool_calls",
    ),
    "system-only": (
        line(msgs({"role": "system", "content": "be nice"})),
        "line 13: needs at least one assistant message with weight 1",
    ),
    "no-format": (line({"question": "q", "answer": "a"}), "line 13: unknown format"),
    "csv": (b"prompt,completion\nq,a\n", "line 1: invalid JSON"),
    # Sizes
    "zero-bytes": (b"", "file contains no examples"),
    "one-byte": (b"{", "line 1: invalid JSON"),
    "only-newlines": (b"\n" * 100_000, "file contains no examples"),
    "line-over-8mib": (
        GOOD + json.dumps(chat("q", "x" * (9 << 20))).encode() + b"\n",
        "line 13: line is longer than 8388608 bytes",
    ),
    "10k-bad-lines": (b"[]\n" * 10_000, "line 20: expected a JSON object"),
}


@pytest.fixture
def key(settings: Settings) -> str:
    return new_tenant(settings)[1]


@SQLITE
@pytest.mark.parametrize(("data", "expected"), CORPUS.values(), ids=CORPUS.keys())
def test_each_bad_file_gets_a_precise_error(
    client: TestClient, key: str, tmp_path: Path, data: bytes, expected: str
) -> None:
    response = upload(client, key, data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "error"
    assert expected in body["status_details"]
    # The trainer reads files with the same rules, and says the same.
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    with pytest.raises(DatasetError) as caught:
        read_examples(path)
    assert any(expected in p for p in caught.value.problems) or expected in str(caught.value)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(out))
        match rng.randrange(5):
            case 0:  # flip a byte
                out[at] = rng.randrange(256)
            case 1:  # cut the file
                del out[at:]
            case 2:  # drop a span
                del out[at : at + rng.randint(1, 40)]
            case 3:  # splice in structural characters
                out[at:at] = rng.choice([b"{", b"}", b"[", b'"', b"\\", b"\n", b"\x00", b"\xff"])
            case _:  # duplicate a span
                out[at:at] = out[at : at + rng.randint(1, 80)]
        if not out:
            break
    return bytes(out)


def test_mutated_files_never_crash_the_scanner() -> None:
    rng = random.Random(9)
    outcomes = {"processed": 0, "error": 0}
    for _ in range(2000):
        data = _mutate(rng, GOOD)
        scanner = DatasetScanner()
        for at in range(0, len(data), 97):  # odd chunks: lines and BOMs split across them
            scanner.feed(data[at : at + 97])
        scanner.finish()
        outcomes["processed" if scanner.ok else "error"] += 1
        assert scanner.ok or all(p.startswith(("line ", "file ")) for p in scanner.problems)
    assert outcomes["processed"] > 10 and outcomes["error"] > 500, outcomes


@SQLITE
def test_mutated_files_never_500_the_api(client: TestClient, key: str) -> None:
    rng = random.Random(11)
    for _ in range(40):
        response = upload(client, key, _mutate(rng, GOOD))
        assert response.status_code == 200, response.text
        assert response.json()["status"] in {"processed", "error"}
