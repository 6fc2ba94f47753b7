"""What a status repeats of the caller's input (gateway/errors.py's shown and bounded), and labels
checked by the same rule as the config file's names."""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.api.models import check_label
from gateway.errors import (
    ECHO_LIMIT,
    STATUS_LIMIT,
    InvalidArgument,
    NotFound,
    Status,
    bounded,
    shown,
)
from modelmux_common.config import ConfigError, load


def test_shown_cuts_and_says_how_long() -> None:
    assert shown("m") == "'m'" and shown("m", quote=False) == "m"
    assert shown(42) == "'42'"  # not a str: its text
    long = "x" * (ECHO_LIMIT + 1)
    assert shown(long) == f"{'x' * ECHO_LIMIT!r}... ({ECHO_LIMIT + 1} characters)"
    assert shown("abcdef", limit=3, quote=False) == "abc... (6 characters)"
    assert shown("x" * ECHO_LIMIT) == repr("x" * ECHO_LIMIT)  # at the limit: whole


def test_bounded_cuts_a_status_message() -> None:
    assert bounded("short") == "short"
    assert bounded("y" * STATUS_LIMIT) == "y" * STATUS_LIMIT
    cut = bounded("y" * (STATUS_LIMIT + 5))
    assert cut == "y" * STATUS_LIMIT + f"... ({STATUS_LIMIT + 5} characters)"


def test_errors_carry_their_status_code() -> None:
    assert NotFound("x").code is grpc.StatusCode.NOT_FOUND
    assert InvalidArgument("x").message == "x"
    passed = Status(grpc.StatusCode.ABORTED, "as it came")
    assert passed.code is grpc.StatusCode.ABORTED and passed.message == "as it came"


@given(text=st.text(max_size=5000), quote=st.booleans())
def test_echo_is_bounded_and_whole_when_short(text: str, quote: bool) -> None:
    out = shown(text, quote=quote)
    if len(text) <= ECHO_LIMIT:
        assert out == (repr(text) if quote else text)
    else:
        assert len(out) <= 4 * ECHO_LIMIT + 40 and f"({len(text)} characters)" in out
    assert len(bounded(text * 3)) <= STATUS_LIMIT + 40


@given(
    label=st.one_of(st.text(max_size=200), st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]{0,140}\Z"))
)
def test_labels_follow_the_config_rule_for_names(
    label: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A label SetVersionLabel takes is one the config file's version_labels would take."""
    config = tmp_path_factory.mktemp("labels") / "modelmux.yaml"
    config.write_text(json.dumps({"version_labels": {"m": {label: 1}}}))  # JSON is YAML
    try:
        load(config)
        valid = True
    except ConfigError:
        valid = False
    if valid:
        check_label(label)
    else:
        with pytest.raises(InvalidArgument) as info:
            check_label(label)
        assert len(info.value.message) < 4 * ECHO_LIMIT + 200
