"""Request bodies decoded with msgspec into typed structs: a wrong type, a missing field or an unknown
field is a 400 ``invalid_request_error`` whose ``param`` names the field."""

from __future__ import annotations

import re
from typing import Final, TypeVar

import msgspec

from erllama.gateway.errors import ApiError, bad_param

T = TypeVar("T")

_AT_PATH: Final = re.compile(r"- at `\$\.?([^`]*)`")
_UNKNOWN: Final = re.compile(r"unknown field `([^`]+)`")
_MISSING: Final = re.compile(r"missing required field `([^`]+)`")


def decode_body(body: bytes, kind: type[T]) -> T:
    """``body`` (JSON) as a ``kind``, or a 400 naming the field at fault."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path = _AT_PATH.search(text)
        prefix = path.group(1) if path else ""
        for pattern in (_UNKNOWN, _MISSING):
            named = pattern.search(text)
            if named is not None:
                field = f"{prefix}.{named.group(1)}" if prefix else named.group(1)
                what = "Unrecognized request argument supplied" if pattern is _UNKNOWN else "Missing field"
                raise bad_param(
                    field, f"{what}: {field}", "unknown_parameter" if pattern is _UNKNOWN else None
                )
        raise bad_param(prefix or "body", f"Invalid value: {text}", "invalid_type") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"The body is not valid JSON: {exc}", code="invalid_json") from None
