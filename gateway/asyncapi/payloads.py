"""Payloads, results and request ids of async requests: the part a handler worker needs too
(nothing here imports grpc or the work layer).

A payload is stored as the bytes the caller sent, with its content type, and decoded for
``handle_async`` as the seeds did: JSON (``application/json`` or ``+json``) -> what ``json.loads``
gives (dict, list, ...), ``text/*`` -> str, anything else -> bytes. A result is JSON when the
handler returned something JSON-serialisable, bytes as they are.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

JSON = "application/json"
OCTETS = "application/octet-stream"
# 1-128 characters; also a valid store key part and SQS message body (docs/work.md)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str) -> bool:
    media = media_type(content_type)
    return media == JSON or media.endswith("+json")


def decode(body: bytes, content_type: str) -> Any:
    """The payload as handle_async receives it. Raises ValueError for JSON or text that does not
    decode (Submit checks that before it accepts a payload)."""
    if is_json(content_type):
        try:
            return json.loads(body)
        except RecursionError:  # json.loads decodes nested arrays and objects recursively
            raise ValueError("JSON nested too deeply") from None
    if media_type(content_type).startswith("text/"):
        return body.decode("utf-8")
    return body


# A content type travels to the handler worker as gRPC metadata (and to S3 as a header): printable
# ASCII only, and short (a media type's two names are at most 127 characters each, RFC 6838)
_CONTENT_TYPE = re.compile(r"^[\x20-\x7e]{0,256}\Z")


def check_content_type(content_type: str) -> str | None:
    """None when ``content_type`` can be stored and passed on, else why not."""
    if _CONTENT_TYPE.match(content_type):
        return None
    return "at most 256 printable ASCII characters"


def check_id(request_id: str) -> str | None:
    """None when ``request_id`` is a valid client-chosen id, else why not."""
    if _ID.match(request_id):
        return None
    return "1 to 128 of letters, digits, '.', '_' or '-', starting with a letter or digit"


def new_id() -> str:
    """A fresh request id: milliseconds since the epoch, then 80 random bits, in hex (ids of one
    API list in submission order)."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"
