"""Wallaroo's HTTP formats, decoded and bounded without a server: pandas-records rows must
all name the same columns (a missing key would be a null the table holds, so a small body
could otherwise ask for rows x columns of memory), and the Content-Type picks the format."""

from __future__ import annotations

import json
import re

import pytest

from hotswap.engine import wallaroo_formats as wf
from hotswap.engine.errors import InvalidInput, RequestTooLarge


def _body(rows: object) -> bytes:
    return json.dumps(rows).encode()


def test_records_become_a_table_of_their_columns() -> None:
    table = wf.decode_records(_body([{"tensor": [1.0, 2.0]}, {"tensor": [3.0, 4.0]}]), 10)
    assert table.column_names == ["tensor"]
    assert table.column("tensor").to_pylist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"a": 1}, {"b": 2}], "give every row the same columns"),
        ([{"a": 1}, {}], "give every row the same columns"),
        ([{f"c{i}": 0 for i in range(wf.MAX_COLUMNS + 1)}], f"at most {wf.MAX_COLUMNS}"),
        ([{"tensor": [2**63]}], "do not make a table"),
        ([{"a": 1}, {"a": "x"}], "do not make a table"),
        ([], "no rows"),
        ({"tensor": [1]}, "a JSON list of row objects"),
        ([1, 2], "a JSON list of row objects"),
    ],
)
def test_bad_records_say_what_to_fix(rows: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        wf.decode_records(_body(rows), 10)


def test_rows_past_the_limit_are_refused_before_a_table_is_built() -> None:
    with pytest.raises(RequestTooLarge, match="at most 2 per call"):
        wf.decode_records(_body([{"a": 1}] * 3), 2)


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("application/json; format=pandas-records", wf.RECORDS),
        ("application/json", wf.RECORDS),
        ("Application/JSON; Format=pandas-records", wf.RECORDS),
        ("application/vnd.apache.arrow.file", wf.ARROW_FILE),
        ("application/vnd.apache.arrow.stream", wf.ARROW_FILE),
    ],
)
def test_the_content_type_picks_the_format(content_type: str, kind: str) -> None:
    assert wf.format_of(content_type) == kind


@pytest.mark.parametrize("content_type", ["", "text/csv", "application/json; format=split"])
def test_other_content_types_are_refused_with_the_ones_taken(content_type: str) -> None:
    with pytest.raises(wf.UnsupportedFormat, match=re.escape(wf.ARROW_FILE)):
        wf.format_of(content_type)
