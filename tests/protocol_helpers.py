"""Helpers of the sans-IO frame tests (test_protocol*.py): parse a frame, expect a refusal."""

import json
from typing import Any

import pytest

from relay.errors import ClientError
from relay.protocol import Limits, parse_frame

LIMITS = Limits()


def parse(obj: Any, limits: Limits = LIMITS) -> object:
    return parse_frame(json.dumps(obj), limits)


def refused(obj: Any, error: type[ClientError], limits: Limits = LIMITS) -> ClientError:
    """The error `parse_frame` raises for `obj`, which must be exactly of type `error`."""
    with pytest.raises(ClientError) as info:
        parse(obj, limits)
    assert type(info.value) is error, info.value
    return info.value


def send(**fields: Any) -> dict[str, Any]:
    return {"type": "send", "to": "bob", "body": "hello", **fields}
