"""Streaming multipart/form-data for uploads: file bytes go straight to an `Upload`.

Starlette's own form parser spools a whole file before the handler runs; this one hands
each chunk to the artifact store and the validator as it arrives. Everything else a form
holds is bounded (each text field, their number, all part headers and fields together, the
bytes around the file), and a body is refused the moment it passes a bound, unread after it:
a form of thousands of fields must not pin the API's memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from api.errors import InvalidRequest, LoraplexError

MAX_FIELD_BYTES = 64 * 1024
# OpenAI's upload form has one text field (`purpose`); room for clients that add a few.
MAX_FIELDS = 16
# Every part's headers and every text field, together: what the parser keeps in memory.
MAX_FORM_BYTES = 256 * 1024
# All a body may hold besides the file's bytes: the above plus boundaries and punctuation.
MAX_ENVELOPE_BYTES = MAX_FORM_BYTES + 64 * 1024


class Upload(Protocol):
    """Where a file part's bytes go as they arrive (a dataset upload, an adapter upload)."""

    size: int

    def write(self, chunk: bytes) -> None: ...

    def abort(self) -> None: ...


U = TypeVar("U", bound=Upload)


@dataclass
class _PartState:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_field: bytes = b""
    header_value: bytes = b""
    name: str = ""
    value: bytearray = field(default_factory=bytearray)
    is_file: bool = False


class UploadForm(Generic[U]):
    """Parses one request; `fields` holds the small text fields, `upload` the file part."""

    def __init__(self, boundary: bytes, *, file_field: str, new_upload: Callable[[str], U]):
        self.fields: dict[str, str] = {}
        self.upload: U | None = None
        self.complete = False
        self._file_field = file_field
        self._new_upload = new_upload
        self._part = _PartState()
        self._n_fields = 0
        self._form_bytes = 0
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_end": self._done,
            },
        )

    def _begin(self) -> None:
        self._part = _PartState()

    def _count(self, n_bytes: int) -> None:
        self._form_bytes += n_bytes
        if self._form_bytes > MAX_FORM_BYTES:
            raise _form_too_large(
                f"The form's fields and part headers exceed {MAX_FORM_BYTES} bytes.",
                param=self._part.name or "file",
            )

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._part.header_field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._part.header_value += data[start:end]

    def _header_end(self) -> None:
        part = self._part
        part.headers[part.header_field.lower()] = part.header_value
        part.header_field, part.header_value = b"", b""

    def _headers_finished(self) -> None:
        part = self._part
        _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if part.name == self._file_field:
            if self.upload is not None:
                raise InvalidRequest("Send exactly one 'file' part.", param="file")
            name = (filename or b"").decode("utf-8", "replace")
            self.upload = self._new_upload(name)
            part.is_file = True
            return
        self._n_fields += 1
        if self._n_fields > MAX_FIELDS:
            raise _form_too_large(
                f"The form has more than {MAX_FIELDS} fields besides the file.", param=part.name
            )

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.is_file:
            assert self.upload is not None
            self.upload.write(data[start:end])
            return
        self._count(end - start)
        part.value += data[start:end]
        if len(part.value) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"Form field {part.name!r} is too long.", param=part.name)

    def _end(self) -> None:
        part = self._part
        if not part.is_file and part.name:
            self.fields[part.name] = part.value.decode("utf-8", "replace")

    def _done(self) -> None:
        self.complete = True

    def check_envelope(self, received: int) -> None:
        """Refuse a body that carries more than MAX_ENVELOPE_BYTES besides the file."""
        file_bytes = self.upload.size if self.upload is not None else 0
        if received - file_bytes > MAX_ENVELOPE_BYTES:
            raise _form_too_large(
                f"The form around the file exceeds {MAX_ENVELOPE_BYTES} bytes.", param="file"
            )

    def abort(self) -> None:
        if self.upload is not None:
            self.upload.abort()


def _form_too_large(message: str, *, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="form_too_large")


def _boundary(request: Request) -> bytes:
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "Uploads must be multipart/form-data with 'file' and 'purpose' fields.",
            param="file",
        )
    return boundary


def least_file_bytes(request: Request) -> int:
    """The fewest file bytes the declared Content-Length allows (0 when none is declared):
    all but the file is bounded by MAX_ENVELOPE_BYTES, so a longer body holds a larger file."""
    declared = request.headers.get("content-length", "")
    return max(0, int(declared) - MAX_ENVELOPE_BYTES) if declared.isdigit() else 0


async def read_upload_form(
    request: Request, *, new_upload: Callable[[str], U], file_field: str = "file"
) -> UploadForm[U]:
    """Stream the body through the parser; on any failure the partial upload is dropped."""
    form = UploadForm(_boundary(request), file_field=file_field, new_upload=new_upload)
    received = 0
    try:
        async for chunk in request.stream():
            if chunk:
                # Disk writes and validation are CPU/IO work: keep them off the event loop.
                await run_in_threadpool(form.parser.write, chunk)
                received += len(chunk)
                form.check_envelope(received)
        form.parser.finalize()
    except (LoraplexError, ClientDisconnect):
        form.abort()
        raise
    except Exception as e:  # the parser's own errors: a malformed body
        form.abort()
        raise InvalidRequest(f"Malformed multipart body: {e}", param="file") from e
    if not form.complete:
        form.abort()
        raise InvalidRequest("The upload was cut off before the end of the form.", param="file")
    if form.upload is None:
        raise InvalidRequest("Missing the 'file' part of the form.", param="file")
    return form
