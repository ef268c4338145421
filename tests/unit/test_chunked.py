"""The relay's chunked-body decoder agrees with gunicorn's own reader, however the bytes arrive.

Each body is read once by gunicorn (its parser on the whole message, its
``wsgi.input`` read to the end) and once by :class:`ChunkedBody` fed the same
bytes whole, a byte at a time, and in random pieces: the same data, the same
error, the same bytes left for the next request.
"""

from __future__ import annotations

import random
from typing import List, Optional, Tuple

import pytest
from gunicorn.config import Config
from gunicorn.http.errors import InvalidChunkSize

from ptth_sync.router.chunked import ChunkedBody
from ptth_sync.router.http1 import request_parser

HEAD = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"

BODIES = {
    "one chunk": b"5\r\nhello\r\n0\r\n\r\n",
    "several chunks": b"5\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\n\r\n",
    "upper-case hex": b"1A\r\n" + b"z" * 26 + b"\r\n0\r\n\r\n",
    "empty body": b"0\r\n\r\n",
    "extensions": b"5;name=value;flag\r\nhello\r\n3 ;q=\"a b\"\r\nabc\r\n0;last\r\n\r\n",
    "trailers": b"5\r\nhello\r\n0\r\nX-Checksum: 42\r\nX-Other: yes\r\n\r\n",
    "a large chunk": b"10000\r\n" + bytes(range(256)) * 256 + b"\r\n0\r\n\r\n",
    "bad size": b"5\r\nhello\r\nzz\r\nxx\r\n0\r\n\r\n",
    "empty size": b"\r\nhello\r\n0\r\n\r\n",
    "no CRLF after the data": b"5\r\nhelloXX0\r\n\r\n",
    "bad extension": b"5;a b\r\nhello\r\n0\r\n\r\n",
    "bad trailer": b"5\r\nhello\r\n0\r\nBad Trailer\r\n\r\n",
    "size line without end": b"0" * 9000,
    "size line too long": b"0" * 9000 + b"5\r\nhello\r\n0\r\n\r\n",
}


def _request(message: bytes):  # type: ignore[no-untyped-def]
    parser = request_parser(Config(), iter([message]), ("127.0.0.1", 1))
    return parser, next(parser)


def gunicorns(body: bytes) -> Tuple[bytes, Optional[type], bytes]:
    """What gunicorn reads of ``body``: its data (or the error it raises) and what follows it."""
    parser, req = _request(HEAD + body + NEXT)
    try:
        data = req.body.read()
    except Exception as exc:
        return b"", type(exc), b""
    return data, None, parser.unreader.take_buffered() + b"".join(parser.unreader.iter)


def ours(pieces: List[bytes]) -> Tuple[bytes, Optional[type], bytes]:
    """What :class:`ChunkedBody` decodes of ``pieces`` (the body and the next request, split up)."""
    _, req = _request(HEAD)
    decoder = ChunkedBody(req)
    data = b""
    try:
        for piece in pieces:
            data += b"".join(decoder.feed(piece))
    except Exception as exc:
        return b"", type(exc), b""
    if not decoder.done:
        return data, EOFError, b""
    return data, None, decoder.leftover


def splits(message: bytes, seed: int) -> List[bytes]:
    rng = random.Random(seed)
    pieces, pos = [], 0
    while pos < len(message):
        step = rng.choice([1, 2, 3, 7, 64, 1000, 70000])
        pieces.append(message[pos:pos + step])
        pos += step
    return pieces


@pytest.mark.parametrize("name", list(BODIES))
def test_the_decoder_reads_each_body_as_gunicorn_does_however_it_is_split(name):
    body = BODIES[name]
    message = body + NEXT
    ways = {"whole": [message], "byte by byte": [message[i:i + 1] for i in range(len(message))]}
    ways.update({f"split {seed}": splits(message, seed) for seed in range(5)})
    if name.startswith("size line"):  # refused past 8190 bytes, however they arrive (gunicorn: when split)
        assert all(ours(pieces)[1] is InvalidChunkSize for pieces in ways.values())
        return
    expected = gunicorns(body)
    for way, pieces in ways.items():
        assert ours(pieces) == expected, way


def test_a_body_cut_short_is_not_done():
    _, req = _request(HEAD)
    decoder = ChunkedBody(req)
    assert b"".join(decoder.feed(b"5\r\nhel")) == b"hel"
    assert not decoder.done
    assert b"".join(decoder.feed(b"lo\r\n0\r\n")) == b"lo"
    assert not decoder.done  # the empty line after the last chunk is still to come
    assert decoder.feed(b"\r\n") == []
    assert decoder.done
    assert decoder.leftover == b""


def test_an_endless_trailer_section_is_refused():
    _, req = _request(HEAD)
    decoder = ChunkedBody(req)
    decoder.feed(b"0\r\n")
    for _ in range(30):  # 240 KB, under every limit
        decoder.feed(b"X-Pad: " + b"p" * 8000 + b"\r\n")
    with pytest.raises(Exception, match="trailer"):  # over 256 KB (gunicorn 26), over 800 KB (gunicorn 27)
        decoder.feed(b"X-Pad: " + b"p" * 600000 + b"\r\n")


def test_data_is_passed_on_without_copies_when_a_read_is_all_data():
    _, req = _request(HEAD)
    decoder = ChunkedBody(req)
    decoder.feed(b"100000\r\n")
    block = bytes(65536)
    assert decoder.feed(block)[0] is block
