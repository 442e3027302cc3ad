"""Logging for every Loraplex process: one format, and API keys redacted on the way out.

Keys travel in Authorization headers, which nothing logs; but a client that puts one in a
URL (`?api_key=...`) or a body would have it written by uvicorn's access log or an error
message. Every handler gets `RedactSecrets`, so no log line ever holds a whole key.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
from typing import Any

from api.services.tenants import KEY_PREFIX

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# An API key (api.services.tenants.KEY_PREFIX + url-safe base64). Four characters stay:
# enough to tell keys apart in a log, far less than the public prefix admin listings show.
KEY_PATTERN = re.compile(rf"({re.escape(KEY_PREFIX)}[A-Za-z0-9_-]{{4}})[A-Za-z0-9_-]{{8,}}")


def redact(text: str) -> str:
    return KEY_PATTERN.sub(r"\1…[redacted]", text)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message and arguments so that no API key survives."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            args = record.args.items()
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in args}
        return True


# Library loggers whose warnings ask nothing of an operator: bitsandbytes names an optional
# CPU kernel package ("Failed to load CPU gemm_4bit_forward", harmless: ML-NOTES.md);
# transformers says checkpoint folders are ordered by step when mtimes look unreliable.
QUIETED = ("bitsandbytes.backends.cpu.ops", "transformers.trainer_utils")
# Progress bars of the Hugging Face libraries; they read these when first imported.
PROGRESS_BAR_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())
    # One line per replica health probe drowns everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.ERROR)
    progress_bars_only_on_a_terminal()


def progress_bars_only_on_a_terminal() -> None:
    """No progress bars unless stderr is a terminal: in a log each redraw is one more line.
    Set in the environment, before the heavy libraries are imported (inside tasks and
    engines), so that this process and its children (worker, replicas) inherit it; an
    operator's own setting wins."""
    if sys.stderr.isatty():
        return
    for name in PROGRESS_BAR_SWITCHES:
        os.environ.setdefault(name, "1")


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's own logging config, with every handler redacting keys."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_secrets": {"()": RedactSecrets}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact_secrets"]
    return config
