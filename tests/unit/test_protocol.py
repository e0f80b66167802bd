"""The wire protocol's framing and encodings (pure: no sockets)."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from colocate import protocol as P


@given(
    kind=st.integers(0, 255),
    flags=st.integers(0, 255),
    code=st.integers(0, 2**16 - 1),
    call_id=st.integers(0, 2**64 - 1),
    body=st.binary(max_size=300),
)
def test_a_frame_is_a_16_byte_header_then_the_body(
    kind: int, flags: int, code: int, call_id: int, body: bytes
) -> None:
    data = P.frame(kind, flags, code, call_id, body)
    assert len(data) == 16 + len(body)
    assert P.HEADER.unpack_from(data) == (len(body), kind, flags, code, call_id)
    assert data[16:] == body


def test_header_layout_is_little_endian_and_fixed() -> None:
    data = P.frame(P.CALL, P.RAW, 3, 0x0102030405060708, b"ab")
    assert data[:4] == b"\x02\x00\x00\x00"
    assert data[4] == P.CALL and data[5] == P.RAW
    assert data[6:8] == b"\x03\x00"
    assert data[8:16] == bytes([8, 7, 6, 5, 4, 3, 2, 1])


def test_a_single_bytes_argument_travels_unpickled() -> None:
    payload = b"x" * 64
    assert P.encode_args((payload,), {}) == (P.RAW, payload)
    assert P.decode_args(P.RAW, memoryview(payload)) == ((payload,), {})


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1, "a"), {}), ((b"x",), {"k": 1}), ((b"x", b"y"), {}), ((bytearray(b"z"),), {})],
)
def test_other_arguments_are_pickled_and_come_back_equal(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    flags, body = P.encode_args(args, kwargs)
    assert flags == P.PICKLED
    assert P.decode_args(flags, body) == (args, kwargs)


@pytest.mark.parametrize(
    ("flags", "body"),
    [
        (P.PICKLED, b"garbage"),
        (P.PICKLED, pickle.dumps([1, 2])),
        (P.PICKLED, pickle.dumps(((1,), [1]))),
        (9, b""),
    ],
)
def test_bad_call_payloads_raise_value_error(flags: int, body: bytes) -> None:
    with pytest.raises(ValueError):
        P.decode_args(flags, body)


def test_results_bytes_raw_others_pickled_even_lambdas() -> None:
    assert P.encode_result(b"r") == (P.RAW, b"r")
    flags, body = P.encode_result({"a": [1, 2]})
    assert flags == P.PICKLED and P.decode_result(flags, body) == {"a": [1, 2]}
    flags, body = P.encode_result(lambda x: x + 1)  # plain pickle fails; cloudpickle ships it
    assert P.decode_result(flags, body)(1) == 2


def test_failures_carry_the_exception_or_at_least_its_type_message_and_traceback() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        body = P.encode_failure(exc)
    exc2, kind, message, tb = P.decode_failure(body)
    assert isinstance(exc2, KeyError) and kind == "builtins.KeyError" and message == "'missing'"
    assert "Traceback" in tb and "test_failures_carry" in tb

    # A class pickle cannot find by name (defined in a function) cannot be rebuilt on the
    # client. (A custom __init__ used to serve, but tblib, which dask.distributed installs
    # process-wide, rebuilds those.)
    class NeedsTwoArgs(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a}-{b}")

    try:
        raise NeedsTwoArgs(1, 2)
    except NeedsTwoArgs as exc:
        body = P.encode_failure(exc)
    exc3, kind, message, tb = P.decode_failure(body)
    assert exc3 is None
    assert kind.endswith("NeedsTwoArgs") and message == "1-2" and "NeedsTwoArgs" in tb


def test_every_status_has_a_name() -> None:
    statuses = [
        P.OK,
        P.RAISED,
        P.EVICTED,
        P.EXPIRED,
        P.UNAUTHORIZED,
        P.TOO_LARGE,
        P.MALFORMED,
        P.LOST,
    ]
    assert len(set(statuses)) == len(statuses)
    assert set(P.STATUS_NAMES) == set(statuses)
