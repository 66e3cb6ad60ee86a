"""The balance route's parsers accept exactly what the contract allows, and refuse all else.

``parse_amount`` (a JSON body), ``parse_user_id`` (the path segment) and ``parse_key``
(the ``Idempotency-Key`` header) either return the value the contract describes or raise
``InvalidRequest`` (a 422): never another exception (a 500), never a coerced value. Each
property compares the parser with an independent reading of the contract (the standard
library's ``json``, a regular expression), over arbitrary values and around every bound.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from balancectl.api.balance_routes import parse_amount, parse_key, parse_user_id
from balancectl.errors import InvalidRequest

MAX_AMOUNT = 10**12
INT64_MAX = 2**63 - 1
EXAMPLES = settings(max_examples=200, deadline=None)


def bounds(*edges: int) -> st.SearchStrategy[int]:
    """Integers within 3 of each edge, and their negations."""
    near = st.sampled_from(edges).flatmap(lambda edge: st.integers(edge - 3, edge + 3))
    return near | near.map(lambda n: -n)


AMOUNT_EDGES = bounds(0, MAX_AMOUNT, INT64_MAX, 2**64, 2**53)
USER_ID_EDGES = bounds(0, INT64_MAX, 2**64, 10**19)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | AMOUNT_EDGES
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# Number-like tokens as a client might type them, valid JSON or not: "01", "+1", "1e3", "-0".
number_tokens = st.from_regex(r"\A[+-]?[0-9]{1,22}(\.[0-9]{0,3})?([eE][+-]?[0-9]{1,3})?\Z")


def allowed_amount(value: object) -> bool:
    """The contract: an integer (a bool is not one), ``0 < |amount| <= 10^12``."""
    return type(value) is int and 0 < abs(value) <= MAX_AMOUNT


def unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """I-JSON (RFC 7493): an object's member names are unique; a repeat refuses the body."""
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate member name in {names}")
    return dict(pairs)


def contract_amount(body: bytes) -> int | None:
    """What the contract makes of a body, read with the standard library; None: refused."""
    try:
        document = json.loads(body.decode("utf-8"), object_pairs_hook=unique_names)
    except (UnicodeDecodeError, ValueError):
        return None
    if not (isinstance(document, dict) and document.keys() == {"amount"}):
        return None
    amount = document["amount"]
    return amount if allowed_amount(amount) else None


def parsed_amount(body: bytes) -> int | None:
    """``parse_amount``'s answer; None when it refused (any other exception fails the test)."""
    try:
        amount = parse_amount(body)
    except InvalidRequest:
        return None
    assert type(amount) is int
    return amount


@EXAMPLES
@given(value=json_values)
@example(value=True)
@example(value=2.0)
@example(value="2")
@example(value=-0.0)
@example(value=MAX_AMOUNT + 1)
@example(value=-MAX_AMOUNT)
def test_amount_is_a_nonzero_int_within_the_bound(value: Any) -> None:
    body = json.dumps({"amount": value}).encode()

    expected = value if allowed_amount(value) else None
    assert parsed_amount(body) == expected


@EXAMPLES
@given(token=number_tokens, spaces=st.sampled_from(["", " ", "\n\t", "\r\n "]))
def test_number_tokens_are_read_as_json_reads_them(token: str, spaces: str) -> None:
    body = f'{spaces}{{"amount":{spaces}{token}{spaces}}}{spaces}'.encode()

    assert parsed_amount(body) == contract_amount(body)


@EXAMPLES
@given(document=st.dictionaries(st.text(max_size=8), json_values, max_size=4))
@example(document={"amount": 5, "Amount": 5})
@example(document={"amount": 5, "extra": None})
@example(document={})
def test_any_field_but_amount_is_refused(document: dict[str, Any]) -> None:
    body = json.dumps(document).encode()

    assert parsed_amount(body) == contract_amount(body)


@EXAMPLES
@given(document=json_values)
def test_any_json_document_is_read_as_the_contract_says(document: Any) -> None:
    body = json.dumps(document).encode()

    assert parsed_amount(body) == contract_amount(body)


@EXAMPLES
@given(body=st.binary(max_size=64) | st.binary(max_size=8).map(lambda b: b'{"amount": 5' + b))
@example(body=b'\xef\xbb\xbf{"amount": 5}')
@example(body=b'{"amount": 5, "\xff": 1}')
@example(body=b'{"amount": NaN}')
@example(body=b"")
def test_arbitrary_bytes_are_refused_or_read_as_json(body: bytes) -> None:
    assert parsed_amount(body) == contract_amount(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"amount": 1, "amount": -999999}',
        b'{"amount": 1, "amount": 1}',
        b'{"amount":-2,"amount":-2,"amount":-2}',
        b'{"amount": 1, "am\\u006funt": -5}',  # the same name, escaped
        b'{"\\u0061mount": 1, "amount": -5}',
    ],
)
def test_a_duplicated_member_name_is_refused(body: bytes) -> None:
    # I-JSON (RFC 7493): a proxy reading the first value would see another request.
    assert contract_amount(body) is None
    with pytest.raises(InvalidRequest, match="more than once"):
        parse_amount(body)


@EXAMPLES
@given(
    value=json_values,
    first=st.sampled_from(['"amount"', '"am\\u006funt"', '"\\u0061\\u006dount"']),
    spaces=st.sampled_from(["", " ", "\n"]),
)
def test_any_body_naming_amount_twice_is_refused(value: Any, first: str, spaces: str) -> None:
    body = f'{{{first}:{spaces}{json.dumps(value)},{spaces}"amount": 5}}'.encode()

    assert parsed_amount(body) is None


# --- userId ------------------------------------------------------------------------------

DIGITS = re.compile(r"[0-9]+")


def contract_user_id(raw: str) -> int | None:
    """ASCII digits only (leading zeros allowed), worth 1 to 2^63-1; None: refused."""
    if not DIGITS.fullmatch(raw):
        return None
    significant = raw.lstrip("0")
    if not significant or len(significant) > 19:
        return None
    value = int(significant)
    return value if value <= INT64_MAX else None


def parsed_user_id(raw: str) -> int | None:
    try:
        user_id = parse_user_id(raw)
    except InvalidRequest:
        return None
    assert type(user_id) is int
    return user_id


@EXAMPLES
@given(number=st.integers() | USER_ID_EDGES, zeros=st.integers(0, 3))
def test_user_id_is_a_positive_int64(number: int, zeros: int) -> None:
    raw = "0" * zeros + str(number)

    expected = number if 1 <= number <= INT64_MAX else None
    assert parsed_user_id(raw) == expected


@EXAMPLES
@given(raw=st.text(max_size=30))
@example(raw="١٢")  # Arabic-Indic digits: str.isdigit() says yes, the contract says no
@example(raw="²")
@example(raw=" 1")
@example(raw="1\n")
@example(raw="+1")
@example(raw="1_000")
@example(raw="")
def test_user_id_text_is_plain_ascii_digits(raw: str) -> None:
    assert parsed_user_id(raw) == contract_user_id(raw)


@settings(max_examples=50, deadline=None)
@given(
    raw=st.integers(4290, 6000).flatmap(
        lambda n: st.sampled_from(["1" * n, "0" * n + "7", "9" * n, "0" * n])
    )
)
def test_user_id_of_thousands_of_digits_is_refused_not_a_crash(raw: str) -> None:
    # Python refuses int() of more than 4300 digits with ValueError, which was a 500.
    assert parsed_user_id(raw) == contract_user_id(raw)


# --- Idempotency-Key -----------------------------------------------------------------------

VISIBLE_ASCII = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


def contract_key(raw: str) -> bool:
    return 1 <= len(raw) <= 255 and all(0x21 <= ord(c) <= 0x7E for c in raw)


@EXAMPLES
@given(raw=st.text(VISIBLE_ASCII, min_size=1, max_size=255))
def test_visible_ascii_keys_of_1_to_255_are_kept_as_sent(raw: str) -> None:
    assert parse_key(raw) == raw


@EXAMPLES
@given(
    raw=st.text(max_size=300)
    | st.text(VISIBLE_ASCII, min_size=250, max_size=300)
    | st.text(st.characters(max_codepoint=0xFF), max_size=10)
)
@example(raw="")
@example(raw="a b")
@example(raw="tab\t")
@example(raw="caf\xe9")
@example(raw="\x7f")
@example(raw="k" * 256)
def test_keys_are_accepted_exactly_when_the_contract_says(raw: str) -> None:
    if contract_key(raw):
        assert parse_key(raw) == raw
    else:
        with pytest.raises(InvalidRequest):
            parse_key(raw)


def test_no_key_is_no_key() -> None:
    assert parse_key(None) is None
