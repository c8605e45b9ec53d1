"""The mk_message encoding, in one process: what goes in comes out, and garbage is refused."""

import pytest

from helpers import without_c
from partition.abi import impl
from partition.abi import message as M


@pytest.fixture(params=["c", "python"])
def decode(request):
    """Both decoders: _message.c's and the Python reference must agree on every case."""
    if request.param == "c":
        if impl.FAST is None:
            without_c("the C extension is not built here")
        return impl.FAST.decode
    return M.decode_py


@pytest.mark.parametrize("payload", [b"", b"x", b"x" * 255, b"x" * 256, b"\xc4\x05abc",
                                     None, 0, 5, -1, 2**40, 1.5, "text", {"a": [1, 2]}, [b"x"]])
def test_every_payload_comes_back_as_it_went(payload, decode):
    """Bytes of up to 255 take a fast path around msgpack (bin 8): same wire format, same
    result; everything else goes through msgpack."""
    data = M.encode(0x4000, M.SUB_REQUEST, 77, payload)
    msg = decode(data, 3, 9)
    assert type(msg) is M.Message
    assert msg == (0x4000, M.SUB_REQUEST, 77, payload, 3, 9)
    assert (msg.msg_type, msg.msg_id, msg.payload, msg.sender, msg.sender_cpu) == \
        (0x4000, 77, payload, 3, 9)


@pytest.mark.parametrize("cut", [0, 5, 19, 21, 22])
def test_a_truncated_or_padded_message_is_refused(cut, decode):
    data = M.encode(0x4000, 0, 1, b"x" * 10)
    assert decode(data[:cut], 1, 1) is None
    assert decode(data + b"\x00", 1, 1) is None            # payload_len no longer matches


def test_a_bin8_header_that_lies_about_its_length_goes_through_msgpack(decode):
    body = b"\xc4\x09" + b"y" * 3                          # claims 9 bytes, has 3
    data = M.HEADER.pack(0x4000, 0, 1, len(body)) + body
    assert decode(data, 1, 1) is None                      # msgpack refuses it: malformed


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x93\x01", b"\xff" * 7])
def test_garbage_payloads_are_not_messages(body, decode):
    data = M.HEADER.pack(0x4000, 0, 1, len(body)) + body
    assert decode(data, 1, 1) is None


def test_the_decoders_agree_on_extreme_header_fields(decode):
    data = M.HEADER.pack(0xFFFFFFFF, 0xFFFFFFFF, 2**64 - 1, 1) + b"\x05"
    assert decode(data, 511, 2**40) == (0xFFFFFFFF, 0xFFFFFFFF, 2**64 - 1, 5, 511, 2**40)
