"""The mk_message encoding, in one process: what goes in comes out, and garbage is refused."""

import pytest

from partition import message as M


@pytest.mark.parametrize("payload", [b"", b"x", b"x" * 255, b"x" * 256, b"\xc4\x05abc",
                                     None, 0, 5, -1, 2**40, 1.5, "text", {"a": [1, 2]}, [b"x"]])
def test_every_payload_comes_back_as_it_went(payload):
    """Bytes of up to 255 take a fast path around msgpack (bin 8): same wire format, same
    result; everything else goes through msgpack."""
    data = M.encode(0x4000, M.SUB_REQUEST, 77, payload)
    msg = M.decode(data, 3, 9)
    assert msg == (0x4000, M.SUB_REQUEST, 77, payload, 3, 9)
    assert (msg.msg_type, msg.msg_id, msg.payload, msg.sender, msg.sender_cpu) == \
        (0x4000, 77, payload, 3, 9)


@pytest.mark.parametrize("cut", [0, 5, 19, 21, 22])
def test_a_truncated_or_padded_message_is_refused(cut):
    data = M.encode(0x4000, 0, 1, b"x" * 10)
    assert M.decode(data[:cut], 1, 1) is None
    assert M.decode(data + b"\x00", 1, 1) is None          # payload_len no longer matches


def test_a_bin8_header_that_lies_about_its_length_goes_through_msgpack():
    body = b"\xc4\x09" + b"y" * 3                          # claims 9 bytes, has 3
    data = M.HEADER.pack(0x4000, 0, 1, len(body)) + body
    assert M.decode(data, 1, 1) is None                    # msgpack refuses it: malformed
