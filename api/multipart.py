"""Streaming multipart/form-data for uploads: file bytes go straight to an `Upload`.

Starlette's own form parser spools a whole file before the handler runs; this one hands
each chunk to the artifact store and the validator as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from api.errors import InvalidRequest, LoraplexError
from api.services.files import Upload

MAX_FIELD_BYTES = 64 * 1024


@dataclass
class _PartState:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_field: bytes = b""
    header_value: bytes = b""
    name: str = ""
    value: bytearray = field(default_factory=bytearray)
    is_file: bool = False


class UploadForm:
    """Parses one request; `fields` holds the small text fields, `upload` the file part."""

    def __init__(self, boundary: bytes, *, file_field: str, new_upload: Callable[[str], Upload]):
        self.fields: dict[str, str] = {}
        self.upload: Upload | None = None
        self.complete = False
        self._file_field = file_field
        self._new_upload = new_upload
        self._part = _PartState()
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

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._part.header_field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
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

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.is_file:
            assert self.upload is not None
            self.upload.write(data[start:end])
            return
        part.value += data[start:end]
        if len(part.value) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"Form field {part.name!r} is too long.", param=part.name)

    def _end(self) -> None:
        part = self._part
        if not part.is_file and part.name:
            self.fields[part.name] = part.value.decode("utf-8", "replace")

    def _done(self) -> None:
        self.complete = True

    def abort(self) -> None:
        if self.upload is not None:
            self.upload.abort()


def _boundary(request: Request) -> bytes:
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "Uploads must be multipart/form-data with 'file' and 'purpose' fields.",
            param="file",
        )
    return boundary


async def read_upload_form(
    request: Request, *, new_upload: Callable[[str], Upload], file_field: str = "file"
) -> UploadForm:
    """Stream the body through the parser; on any failure the partial upload is dropped."""
    form = UploadForm(_boundary(request), file_field=file_field, new_upload=new_upload)
    try:
        async for chunk in request.stream():
            if chunk:
                # Disk writes and validation are CPU/IO work: keep them off the event loop.
                await run_in_threadpool(form.parser.write, chunk)
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
