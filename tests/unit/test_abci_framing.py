"""ABCI wire: unsigned-varint framing (vectors, partial reads), request mapping, and the
socket server end to end over loopback with a fake CometBFT client (no Go needed)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medledger.consensus.abci import (
    AbciServer,
    FrameDecoder,
    FramingError,
    RequestHandler,
    decode_varint,
    encode_varint,
    frame,
    pb,
)
from medledger.consensus.app import AppInfo, BlockOutcome, QueryResult, TxResult
from medledger.errors import StorageError

# (value, encoding) - the same bytes Go's binary.PutUvarint writes; NOT zigzag.
VARINT_VECTORS = [
    (0, b"\x00"),
    (1, b"\x01"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (300, b"\xac\x02"),
    (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"),
    (2**31 - 1, b"\xff\xff\xff\xff\x07"),
    (2**64 - 1, b"\xff" * 9 + b"\x01"),
]


@pytest.mark.parametrize(("value", "encoded"), VARINT_VECTORS)
def test_varint_vectors(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded
    assert decode_varint(encoded) == (value, len(encoded))
    assert decode_varint(b"junk" + encoded, 4) == (value, 4 + len(encoded))


def test_varint_is_not_zigzag() -> None:
    # zigzag would encode 1 as 0x02; CometBFT's length prefix is plain unsigned.
    assert encode_varint(1) == b"\x01"
    assert frame(b"\x0a\x00") == b"\x02\x0a\x00"


def test_varint_incomplete_and_overflow() -> None:
    assert decode_varint(b"") is None
    assert decode_varint(b"\x80") is None
    assert decode_varint(b"\xff\xff") is None
    with pytest.raises(FramingError):
        decode_varint(b"\xff" * 10 + b"\x01")  # 11 bytes
    with pytest.raises(FramingError):
        decode_varint(b"\xff" * 9 + b"\x02")  # 2**64
    with pytest.raises(ValueError):
        encode_varint(-1)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_roundtrip(value: int) -> None:
    enc = encode_varint(value)
    assert decode_varint(enc) == (value, len(enc))
    assert decode_varint(enc[:-1]) is None


@given(
    st.lists(st.binary(max_size=300), max_size=12),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=40),
)
def test_decoder_reassembles_any_chunking(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(m) for m in messages)
    decoder = FrameDecoder()
    out: list[bytes] = []
    pos, i = 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out += decoder.feed(stream[pos : pos + step])
        pos += step
        i += 1
    assert out == messages
    assert decoder.buffered == 0


def test_decoder_byte_at_a_time_and_many_in_one_chunk() -> None:
    msgs = [b"", b"a", b"x" * 200, bytes(range(256)) * 3]
    stream = b"".join(frame(m) for m in msgs)
    decoder = FrameDecoder()
    out: list[bytes] = []
    for b in stream:
        out += decoder.feed(bytes([b]))
    assert out == msgs
    assert FrameDecoder().feed(stream) == msgs
    partial = FrameDecoder()
    assert partial.feed(stream[:-1]) == msgs[:-1]
    assert partial.buffered > 0
    assert partial.feed(stream[-1:]) == msgs[-1:]


def test_decoder_rejects_oversized_message() -> None:
    decoder = FrameDecoder(max_message_bytes=10)
    with pytest.raises(FramingError):
        decoder.feed(encode_varint(11))


# --------------------------------------------------------------------------- mapping


class RecordingApp:
    """Records calls; ``raise_on`` names methods that blow up."""

    def __init__(self, raise_on: frozenset[str] = frozenset()) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.raise_on = raise_on

    def _maybe_raise(self, name: str) -> None:
        if name in self.raise_on:
            raise RuntimeError(f"{name} exploded")

    def info(self) -> AppInfo:
        self._maybe_raise("info")
        return AppInfo(last_block_height=7, last_block_app_hash=b"\x07" * 32)

    def init_chain(self, chain_id: str, app_state_bytes: bytes, time_ns: int) -> bytes:
        self.calls.append(("init_chain", chain_id, app_state_bytes, time_ns))
        return b"\x01" * 32

    def check_tx(self, tx: bytes, recheck: bool) -> TxResult:
        self.calls.append(("check_tx", tx, recheck))
        self._maybe_raise("check_tx")
        return TxResult(code=0 if tx else 2, log="" if tx else "empty")

    def finalize_block(
        self, height: int, time_ns: int, txs: list[bytes], proposer: bytes, block_hash: bytes
    ) -> BlockOutcome:
        self.calls.append(("finalize_block", height, time_ns, txs, proposer, block_hash))
        self._maybe_raise("finalize_block")
        results = tuple(
            TxResult(code=0, data=tx, events=(("kv", (("key", tx.decode()),)),)) for tx in txs
        )
        if "short" in self.raise_on:
            results = results[:-1]
        return BlockOutcome(
            tx_results=results,
            app_hash=hashlib.sha256(b"".join(txs)).digest(),
            validator_updates=((b"\x09" * 32, 5),),
        )

    def commit(self) -> int:
        self.calls.append(("commit",))
        return 3

    def query(self, path: str, data: bytes, height: int) -> QueryResult:
        self._maybe_raise("query")
        return QueryResult(code=0, value=data[::-1], height=height)


def last_call(app: RecordingApp) -> tuple[object, ...]:
    return app.calls[-1]


def _ts(seconds: int, nanos: int) -> dict[str, int]:
    return {"seconds": seconds, "nanos": nanos}


def test_handler_maps_every_request() -> None:
    app = RecordingApp()
    h = RequestHandler(app)

    assert h.handle(pb.Request(echo=pb.RequestEcho(message="hi"))).echo.message == "hi"
    assert h.handle(pb.Request(flush=pb.RequestFlush())).WhichOneof("value") == "flush"

    info = h.handle(pb.Request(info=pb.RequestInfo(version="0.38.25"))).info
    assert (info.last_block_height, info.last_block_app_hash) == (7, b"\x07" * 32)
    assert info.app_version == 1

    init = h.handle(
        pb.Request(
            init_chain=pb.RequestInitChain(
                chain_id="c", app_state_bytes=b'{"orgs":[]}', time=_ts(1_700_000_000, 5)
            )
        )
    ).init_chain
    assert init.app_hash == b"\x01" * 32 and len(init.validators) == 0
    assert last_call(app) == ("init_chain", "c", b'{"orgs":[]}', 1_700_000_000_000_000_005)

    chk = h.handle(pb.Request(check_tx=pb.RequestCheckTx(tx=b"a", type=pb.RECHECK))).check_tx
    assert chk.code == 0 and last_call(app) == ("check_tx", b"a", True)
    chk = h.handle(pb.Request(check_tx=pb.RequestCheckTx(tx=b"", type=pb.NEW))).check_tx
    assert (chk.code, chk.log) == (2, "empty") and last_call(app) == ("check_tx", b"", False)

    prep = h.handle(
        pb.Request(
            prepare_proposal=pb.RequestPrepareProposal(
                max_tx_bytes=5, txs=[b"aa", b"bbb", b"c", b"d"]
            )
        )
    ).prepare_proposal
    assert list(prep.txs) == [b"aa", b"bbb"]  # CometBFT's default: stop at the first overflow

    proc = h.handle(pb.Request(process_proposal=pb.RequestProcessProposal(txs=[b"x"])))
    assert proc.process_proposal.status == pb.ResponseProcessProposal.ACCEPT
    assert (
        h.handle(pb.Request(extend_vote=pb.RequestExtendVote())).extend_vote.vote_extension == b""
    )
    ver = h.handle(pb.Request(verify_vote_extension=pb.RequestVerifyVoteExtension()))
    assert ver.verify_vote_extension.status == pb.ResponseVerifyVoteExtension.ACCEPT

    fin = h.handle(
        pb.Request(
            finalize_block=pb.RequestFinalizeBlock(
                height=4,
                time=_ts(10, 20),
                txs=[b"k1", b"k2"],
                proposer_address=b"\xaa" * 20,
                hash=b"\xbb" * 32,
            )
        )
    ).finalize_block
    assert last_call(app) == (
        "finalize_block",
        4,
        10_000_000_020,
        [b"k1", b"k2"],
        b"\xaa" * 20,
        b"\xbb" * 32,
    )
    assert [r.data for r in fin.tx_results] == [b"k1", b"k2"]
    assert fin.tx_results[0].events[0].type == "kv"
    assert fin.tx_results[0].events[0].attributes[0].key == "key"
    assert fin.tx_results[0].events[0].attributes[0].value == "k1"
    assert fin.app_hash == hashlib.sha256(b"k1k2").digest()
    assert fin.validator_updates[0].pub_key.ed25519 == b"\x09" * 32
    assert fin.validator_updates[0].power == 5

    assert h.handle(pb.Request(commit=pb.RequestCommit())).commit.retain_height == 3

    q = h.handle(pb.Request(query=pb.RequestQuery(path="/k", data=b"abc", height=2))).query
    assert (q.code, q.value, q.height) == (0, b"cba", 2)

    assert (
        len(h.handle(pb.Request(list_snapshots=pb.RequestListSnapshots())).list_snapshots.snapshots)
        == 0
    )
    offer = h.handle(pb.Request(offer_snapshot=pb.RequestOfferSnapshot())).offer_snapshot
    assert offer.result == pb.ResponseOfferSnapshot.ABORT
    load = h.handle(pb.Request(load_snapshot_chunk=pb.RequestLoadSnapshotChunk()))
    assert load.load_snapshot_chunk.chunk == b""
    apply = h.handle(pb.Request(apply_snapshot_chunk=pb.RequestApplySnapshotChunk()))
    assert apply.apply_snapshot_chunk.result == pb.ResponseApplySnapshotChunk.ABORT

    assert h.handle(pb.Request()).WhichOneof("value") == "exception"


def test_check_tx_and_query_exceptions_become_codes() -> None:
    h = RequestHandler(RecordingApp(raise_on=frozenset({"check_tx", "query"})))
    chk = h.handle(pb.Request(check_tx=pb.RequestCheckTx(tx=b"a"))).check_tx
    assert chk.code == 1 and "check_tx exploded" in chk.log
    q = h.handle(pb.Request(query=pb.RequestQuery(path="/k"))).query
    assert q.code == 1 and "query exploded" in q.log


# --------------------------------------------------------------------------- socket server


async def _roundtrip(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    reqs: list[pb.Request],
    split: int = 0,
) -> list[pb.Response]:
    data = b"".join(frame(r.SerializeToString()) for r in reqs)
    if split:  # dribble the bytes in to exercise partial reads on the server
        for i in range(0, len(data), split):
            writer.write(data[i : i + split])
            await writer.drain()
            await asyncio.sleep(0)
    else:
        writer.write(data)
        await writer.drain()
    decoder = FrameDecoder()
    out: list[pb.Response] = []
    while len(out) < len(reqs):
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, "server closed the connection"
        out += [pb.Response.FromString(p) for p in decoder.feed(chunk)]
    return out


def test_server_answers_in_order_per_connection_with_partial_reads() -> None:
    async def main() -> None:
        app = RecordingApp()
        async with AbciServer(app, port=0) as server:
            conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
            reqs = [pb.Request(echo=pb.RequestEcho(message=str(i))) for i in range(50)]
            reqs += [pb.Request(check_tx=pb.RequestCheckTx(tx=b"t%d" % i)) for i in range(50)]
            reqs.append(pb.Request(flush=pb.RequestFlush()))
            results = await asyncio.gather(
                *(
                    _roundtrip(r, w, reqs, split=split)
                    for (r, w), split in zip(conns, [0, 1, 7, 1000], strict=True)
                )
            )
            for resps in results:
                kinds = [r.WhichOneof("value") for r in resps]
                assert kinds == ["echo"] * 50 + ["check_tx"] * 50 + ["flush"]
                assert [r.echo.message for r in resps[:50]] == [str(i) for i in range(50)]
            for _, w in conns:
                w.close()
        assert server.fatal_error is None

    asyncio.run(main())


def test_server_answers_every_flush_of_a_read_holding_many() -> None:
    # CometBFT's client sends a Flush after nearly every request, and a busy server
    # reads many request + Flush pairs at once; it answers them together at the end of
    # the read, and none may wait for more input (the client would wait forever).
    async def main() -> None:
        async with AbciServer(RecordingApp(), port=0) as server:
            for split in (0, 1, 300):
                r, w = await asyncio.open_connection("127.0.0.1", server.port)
                reqs: list[pb.Request] = []
                for i in range(150):  # > _YIELD_EVERY: answers also go out at a yield
                    reqs.append(pb.Request(check_tx=pb.RequestCheckTx(tx=b"t%d" % i)))
                    reqs.append(pb.Request(flush=pb.RequestFlush()))
                resps = await _roundtrip(r, w, reqs, split=split)
                assert [x.WhichOneof("value") for x in resps] == ["check_tx", "flush"] * 150
                w.close()
        assert server.fatal_error is None

    asyncio.run(main())


def test_server_writes_a_long_burst_before_its_flush() -> None:
    # Answers wait for a Flush (as with CometBFT's own server), but a burst of answers
    # larger than the write buffer goes out without one: a client that sends many
    # requests before flushing never stalls the server or itself.
    async def main() -> None:
        async with AbciServer(RecordingApp(), port=0) as server:
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            big = "x" * 2000
            reqs = [pb.Request(echo=pb.RequestEcho(message=f"{i}{big}")) for i in range(100)]
            w.write(b"".join(frame(q.SerializeToString()) for q in reqs))
            await w.drain()
            decoder, got = FrameDecoder(), []
            while len(got) < 32:  # 32 x 2 KB > the 64 KiB write buffer
                chunk = await asyncio.wait_for(r.read(65536), 5)
                assert chunk, "server closed the connection"
                got += [pb.Response.FromString(p) for p in decoder.feed(chunk)]
            assert [g.echo.message[:2] for g in got[:10]] == [str(i) + "x" for i in range(10)]
            w.close()
        assert server.fatal_error is None

    asyncio.run(main())


def test_server_on_a_private_unix_socket(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "abci.sock"
        server = AbciServer.at(RecordingApp(), f"unix://{path}")
        async with server:
            assert server.address == f"unix://{path}"
            assert stat.S_ISSOCK(path.stat().st_mode)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            r, w = await asyncio.open_unix_connection(str(path))
            resps = await _roundtrip(r, w, [pb.Request(echo=pb.RequestEcho(message="u")),
                                            pb.Request(flush=pb.RequestFlush())])
            assert resps[0].echo.message == "u"
            w.close()
        assert not path.exists()  # removed on stop
        # a socket a killed server left behind is replaced on the next start
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()
        async with AbciServer.at(RecordingApp(), f"unix://{path}"):
            r, w = await asyncio.open_unix_connection(str(path))
            w.close()

    asyncio.run(main())


def test_a_second_server_leaves_a_live_socket_alone(tmp_path: Path) -> None:
    """The node started twice: the second must not unlink the first's socket."""
    async def main() -> None:
        path = tmp_path / "abci.sock"
        async with AbciServer.at(RecordingApp(), f"unix://{path}"):
            with pytest.raises(StorageError, match="already serves ABCI"):
                await AbciServer.at(RecordingApp(), f"unix://{path}").start()
            r, w = await asyncio.open_unix_connection(str(path))  # still the first's
            resps = await _roundtrip(r, w, [pb.Request(echo=pb.RequestEcho(message="1")),
                                            pb.Request(flush=pb.RequestFlush())])
            assert resps[0].echo.message == "1"
            w.close()
        assert not path.exists()

    asyncio.run(main())


@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "tcp://:80", "http://h:1", "unix://",
                                     "127.0.0.1:26658", "tcp://h:port"])
def test_abci_address_must_be_tcp_or_unix(address: str) -> None:
    with pytest.raises(ValueError, match="tcp://HOST:PORT or unix://PATH"):
        AbciServer.at(RecordingApp(), address)


def test_abci_address_tcp() -> None:
    server = AbciServer.at(RecordingApp(), "tcp://127.0.0.1:26658")
    assert (server.host, server.port, server.path) == ("127.0.0.1", 26658, None)
    assert AbciServer.at(RecordingApp(), "tcp://[::1]:5").host == "::1"


def test_server_fatal_on_finalize_block_error_drops_connections() -> None:
    async def main() -> None:
        for mode in ("finalize_block", "short"):
            app = RecordingApp(raise_on=frozenset({mode}))
            server = AbciServer(app, port=0)
            await server.start()
            try:
                r1, w1 = await asyncio.open_connection("127.0.0.1", server.port)
                r2, w2 = await asyncio.open_connection("127.0.0.1", server.port)  # e.g. mempool
                req = pb.Request(finalize_block=pb.RequestFinalizeBlock(height=1, txs=[b"a", b"b"]))
                w1.write(
                    frame(req.SerializeToString())
                    + frame(pb.Request(flush=pb.RequestFlush()).SerializeToString())
                )
                await w1.drain()
                assert await asyncio.wait_for(r1.read(), 5) == b""  # closed, no answer
                assert await asyncio.wait_for(r2.read(), 5) == b""  # every connection dropped
                await asyncio.wait_for(server.wait_stopped(), 5)
                assert server.fatal_error is not None
                w1.close()
                w2.close()
            finally:
                await server.stop()

    asyncio.run(main())


def test_server_closes_connection_on_garbage() -> None:
    async def main() -> None:
        async with AbciServer(RecordingApp(), port=0) as server:
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(frame(b"\xff\xff\xff"))  # not a protobuf Request
            await w.drain()
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            # the server keeps serving other connections
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            out = await _roundtrip(r, w, [pb.Request(echo=pb.RequestEcho(message="ok")),
                                          pb.Request(flush=pb.RequestFlush())])
            assert out[0].echo.message == "ok"
            w.close()
            assert server.fatal_error is None

    asyncio.run(main())


def test_struct_sanity_timestamp_nanos() -> None:
    # Timestamp conversion keeps full nanosecond precision (no float rounding).
    h = RequestHandler(RecordingApp())
    app = h.app
    assert isinstance(app, RecordingApp)
    big = 4_102_444_800  # year 2100
    h.handle(pb.Request(init_chain=pb.RequestInitChain(chain_id="c", time=_ts(big, 999_999_999))))
    assert app.calls[-1][3] == big * 1_000_000_000 + 999_999_999
    assert struct.pack(">q", app.calls[-1][3])  # fits int64 like Go's UnixNano
