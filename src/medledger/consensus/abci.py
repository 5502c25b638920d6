"""CometBFT v0.38 ABCI socket server (asyncio) driving a ``LedgerApplication``.

Owns the wire: framing (each message is a protobuf ``tendermint.abci.Request`` /
``Response`` prefixed by its length as an *unsigned* varint, as Go's
``binary.PutUvarint``), the mapping of ABCI requests onto the application contract in
``medledger.consensus.app``, and the failure policy.

CometBFT opens four connections (consensus, mempool, query, snapshot). Each is served
strictly in order: one request, one response, in request order; responses are buffered
until a ``Flush`` is answered, which pushes them out (as CometBFT's own socket server
does). The application's methods are synchronous and fast,
so they run inline on the event loop: one loop thread means the app never sees two
calls at once, whatever connection they came from.

Failure policy (never raise into CometBFT):
- ``check_tx`` / ``query`` raising -> a ``code=1`` answer carrying the error in ``log``.
- ``info`` / ``init_chain`` / ``finalize_block`` / ``commit`` raising, or returning a
  wrong number of tx results, is a node-fatal bug: it is logged loudly, the server
  records it in ``AbciServer.fatal_error`` and drops every connection. CometBFT then
  halts, which is better than diverging from the other validators.

Generated protobuf classes live in ``medledger.consensus._proto`` (run
``scripts/gen_proto.py``; they are not committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterable

from medledger.consensus.app import LedgerApplication, TxResult
from medledger.errors import StorageError

try:
    from medledger.consensus._proto.tendermint.abci import types_pb2 as pb
    from medledger.consensus._proto.tendermint.crypto import keys_pb2
except ImportError as exc:  # pragma: no cover - depends on the install step
    raise ImportError(
        "ABCI protobuf classes are missing: run `python scripts/gen_proto.py` "
        "(needs Go and grpcio-tools) to generate medledger.consensus._proto"
    ) from exc

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "AbciServer",
    "FrameDecoder",
    "FramingError",
    "RequestHandler",
    "decode_varint",
    "encode_varint",
    "frame",
    "pb",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # CometBFT allows 2 GiB; blocks are ~21 MiB
_MAX_VARINT_BYTES = 10
_READ_CHUNK = 256 * 1024
_YIELD_EVERY = 64  # messages handled between voluntary yields to the event loop
_WRITE_AT = 64 * 1024  # buffered response bytes written out even before a Flush


# --------------------------------------------------------------------------- framing


class FramingError(Exception):
    """The peer sent bytes that are not a valid length-prefixed ABCI stream."""


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128 varint (Go ``binary.PutUvarint``); not zigzag."""
    if value < 0:
        raise ValueError("varint length must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """Decode an unsigned varint at ``buf[pos:]``: ``(value, next_pos)``, or ``None`` if
    the buffer ends inside it. Raises ``FramingError`` on a varint longer than 64 bits."""
    value = 0
    shift = 0
    for i in range(pos, len(buf)):
        byte = buf[i]
        if i - pos >= _MAX_VARINT_BYTES or (i - pos == _MAX_VARINT_BYTES - 1 and byte > 1):
            raise FramingError("varint length prefix overflows 64 bits")
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    return None


def frame(payload: bytes) -> bytes:
    """``payload`` with its unsigned-varint length prefix."""
    return encode_varint(len(payload)) + payload


class FrameDecoder:
    """Incremental splitter of a byte stream into length-prefixed messages.

    ``feed`` accepts arbitrary chunks (a message may arrive split anywhere, including
    inside its length prefix, or many messages in one chunk) and returns the payloads
    completed so far, in order.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_message_bytes

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a complete message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        messages: list[bytes] = []
        pos = 0
        while True:
            head = decode_varint(self._buf, pos)
            if head is None:
                break
            length, start = head
            if length > self._max:
                raise FramingError(f"message of {length} bytes exceeds the {self._max}-byte limit")
            end = start + length
            if end > len(self._buf):
                break
            messages.append(bytes(self._buf[start:end]))
            pos = end
        if pos:
            del self._buf[:pos]
        return messages


# --------------------------------------------------------------------------- mapping


class _FatalAppError(Exception):
    """The application failed where CometBFT cannot continue safely."""


def _time_ns(ts: object) -> int:
    seconds = int(getattr(ts, "seconds", 0))
    nanos = int(getattr(ts, "nanos", 0))
    return seconds * 1_000_000_000 + nanos


def _events(events: Iterable[tuple[str, Iterable[tuple[str, str]]]]) -> list[pb.Event]:
    return [
        pb.Event(
            type=kind,
            attributes=[pb.EventAttribute(key=k, value=v, index=True) for k, v in attrs],
        )
        for kind, attrs in events
    ]


def _exec_result(result: TxResult) -> pb.ExecTxResult:
    return pb.ExecTxResult(
        code=result.code, data=result.data, log=result.log, events=_events(result.events)
    )


def _select_txs(txs: Iterable[bytes], max_tx_bytes: int) -> list[bytes]:
    """Proposal txs in mempool order, stopping before ``max_tx_bytes`` is exceeded
    (CometBFT's own default ``PrepareProposal``)."""
    selected: list[bytes] = []
    total = 0
    for tx in txs:
        total += len(tx)
        if total > max_tx_bytes:
            break
        selected.append(tx)
    return selected


# The answer to nearly every CheckTx (admitted, nothing to say): built and framed once.
CHECK_TX_OK = pb.Response(check_tx=pb.ResponseCheckTx(code=0))
_CHECK_TX_OK_FRAME = frame(CHECK_TX_OK.SerializeToString())


def _framed(resp: pb.Response) -> bytes:
    return _CHECK_TX_OK_FRAME if resp is CHECK_TX_OK else frame(resp.SerializeToString())


class RequestHandler:
    """Maps one ABCI ``Request`` to its ``Response`` by calling the application.

    Pure request/response mapping, no I/O: the socket server wraps it, tests may
    call it directly. Raises ``_FatalAppError`` where the node must halt.
    """

    def __init__(self, app: LedgerApplication) -> None:
        self.app = app

    def handle(self, req: pb.Request) -> pb.Response:
        kind = req.WhichOneof("value")
        method = getattr(self, f"_on_{kind}", None) if kind else None
        if method is None:
            log.error("ABCI: unsupported request %r", kind)
            return pb.Response(exception=pb.ResponseException(error=f"unsupported: {kind}"))
        response: pb.Response = method(getattr(req, kind))
        return response

    # -- info / connection plumbing

    def _on_echo(self, req: pb.RequestEcho) -> pb.Response:
        return pb.Response(echo=pb.ResponseEcho(message=req.message))

    def _on_flush(self, req: pb.RequestFlush) -> pb.Response:
        return pb.Response(flush=pb.ResponseFlush())

    def _on_info(self, req: pb.RequestInfo) -> pb.Response:
        try:
            info = self.app.info()
        except Exception as exc:
            raise _FatalAppError(f"info failed: {exc!r}") from exc
        log.info(
            "ABCI Info: cometbft %s, app at height %d hash %s",
            req.version,
            info.last_block_height,
            info.last_block_app_hash.hex(),
        )
        return pb.Response(
            info=pb.ResponseInfo(
                data="medledger",
                version=info.version,
                app_version=info.app_version,
                last_block_height=info.last_block_height,
                last_block_app_hash=info.last_block_app_hash,
            )
        )

    # -- consensus connection

    def _on_init_chain(self, req: pb.RequestInitChain) -> pb.Response:
        try:
            app_hash = self.app.init_chain(req.chain_id, req.app_state_bytes, _time_ns(req.time))
        except Exception as exc:
            raise _FatalAppError(f"init_chain failed: {exc!r}") from exc
        # No validators in the answer = accept the genesis validator set as is.
        return pb.Response(init_chain=pb.ResponseInitChain(app_hash=app_hash))

    def _on_prepare_proposal(self, req: pb.RequestPrepareProposal) -> pb.Response:
        txs = _select_txs(req.txs, req.max_tx_bytes)
        return pb.Response(prepare_proposal=pb.ResponsePrepareProposal(txs=txs))

    def _on_process_proposal(self, req: pb.RequestProcessProposal) -> pb.Response:
        return pb.Response(
            process_proposal=pb.ResponseProcessProposal(status=pb.ResponseProcessProposal.ACCEPT)
        )

    def _on_extend_vote(self, req: pb.RequestExtendVote) -> pb.Response:
        return pb.Response(extend_vote=pb.ResponseExtendVote())

    def _on_verify_vote_extension(self, req: pb.RequestVerifyVoteExtension) -> pb.Response:
        return pb.Response(
            verify_vote_extension=pb.ResponseVerifyVoteExtension(
                status=pb.ResponseVerifyVoteExtension.ACCEPT
            )
        )

    def _on_finalize_block(self, req: pb.RequestFinalizeBlock) -> pb.Response:
        txs = list(req.txs)
        try:
            outcome = self.app.finalize_block(
                req.height, _time_ns(req.time), txs, req.proposer_address, req.hash
            )
        except Exception as exc:
            raise _FatalAppError(f"finalize_block at height {req.height} failed: {exc!r}") from exc
        if len(outcome.tx_results) != len(txs):
            raise _FatalAppError(
                f"finalize_block at height {req.height} returned {len(outcome.tx_results)} "
                f"results for {len(txs)} txs"
            )
        return pb.Response(
            finalize_block=pb.ResponseFinalizeBlock(
                tx_results=[_exec_result(r) for r in outcome.tx_results],
                validator_updates=[
                    pb.ValidatorUpdate(pub_key=keys_pb2.PublicKey(ed25519=key), power=power)
                    for key, power in outcome.validator_updates
                ],
                app_hash=outcome.app_hash,
            )
        )

    def _on_commit(self, req: pb.RequestCommit) -> pb.Response:
        try:
            retain_height = self.app.commit()
        except Exception as exc:
            raise _FatalAppError(f"commit failed: {exc!r}") from exc
        return pb.Response(commit=pb.ResponseCommit(retain_height=retain_height))

    # -- mempool connection

    def _on_check_tx(self, req: pb.RequestCheckTx) -> pb.Response:
        try:
            result = self.app.check_tx(req.tx, req.type == pb.RECHECK)
        except Exception as exc:
            log.exception("ABCI: check_tx raised; answering code=1")
            result = TxResult(code=1, log=f"internal error in check_tx: {exc!r}")
        if result.code == 0 and not (result.data or result.log or result.events):
            return CHECK_TX_OK  # shared: never modified
        return pb.Response(
            check_tx=pb.ResponseCheckTx(
                code=result.code,
                data=result.data,
                log=result.log,
                events=_events(result.events),
            )
        )

    # -- query connection

    def _on_query(self, req: pb.RequestQuery) -> pb.Response:
        try:
            res = self.app.query(req.path, req.data, req.height)
            answer = pb.ResponseQuery(
                code=res.code, value=res.value, log=res.log, height=res.height, key=req.data
            )
        except Exception as exc:
            log.exception("ABCI: query %r raised; answering code=1", req.path)
            answer = pb.ResponseQuery(code=1, log=f"internal error in query: {exc!r}")
        return pb.Response(query=answer)

    # -- snapshot connection (state sync is not supported: nothing to offer, abort offers)

    def _on_list_snapshots(self, req: pb.RequestListSnapshots) -> pb.Response:
        return pb.Response(list_snapshots=pb.ResponseListSnapshots())

    def _on_offer_snapshot(self, req: pb.RequestOfferSnapshot) -> pb.Response:
        return pb.Response(
            offer_snapshot=pb.ResponseOfferSnapshot(result=pb.ResponseOfferSnapshot.ABORT)
        )

    def _on_load_snapshot_chunk(self, req: pb.RequestLoadSnapshotChunk) -> pb.Response:
        return pb.Response(load_snapshot_chunk=pb.ResponseLoadSnapshotChunk())

    def _on_apply_snapshot_chunk(self, req: pb.RequestApplySnapshotChunk) -> pb.Response:
        return pb.Response(
            apply_snapshot_chunk=pb.ResponseApplySnapshotChunk(
                result=pb.ResponseApplySnapshotChunk.ABORT
            )
        )


# --------------------------------------------------------------------------- server


class AbciServer:
    """Serves CometBFT's ABCI socket connections for one application instance.

    On TCP (``host``, ``port``; ``port=0`` binds a free port, read back from ``.port``
    after ``start()``), or on a Unix socket at ``path``, created ``0600``: ABCI has no
    authentication, so a Unix socket in a private directory is the only way to keep
    other local users from feeding the application blocks.
    """

    def __init__(
        self,
        app: LedgerApplication,
        host: str = "127.0.0.1",
        port: int = 26658,
        *,
        path: str | os.PathLike[str] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.app = app
        self.host = host
        self._port = port
        self.path = os.fspath(path) if path else None
        self._inode = -1
        self._handler = RequestHandler(app)
        self._max_message_bytes = max_message_bytes
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopped = asyncio.Event()
        self._fail_task: asyncio.Task[None] | None = None
        self.fatal_error: BaseException | None = None

    @property
    def port(self) -> int:
        return self._port

    @classmethod
    def at(cls, app: LedgerApplication, address: str) -> AbciServer:
        """A server for a ``proxy_app`` address: ``tcp://HOST:PORT`` or ``unix://PATH``."""
        scheme, sep, rest = address.partition("://")
        if sep and scheme == "unix" and rest:
            return cls(app, path=rest)
        host, colon, port = rest.rpartition(":")
        if not (sep and scheme == "tcp" and colon and host and port.isdigit()):
            raise ValueError(f"ABCI address {address!r} is not tcp://HOST:PORT or unix://PATH")
        return cls(app, host.removeprefix("[").removesuffix("]"), int(port))  # [::1]

    @staticmethod
    def refuse_if_served(path: str) -> None:
        """A live server at ``path`` (this node started twice) keeps it: binding would
        unlink its socket from under it."""
        if not os.path.exists(path):
            return
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
            except OSError:
                return  # nobody answers: a stale file, replaced on bind
        raise StorageError(f"another process already serves ABCI at {path}: is this node "
                           "running already?")

    @property
    def address(self) -> str:
        """The ``proxy_app`` value CometBFT needs to reach this server."""
        return f"unix://{self.path}" if self.path else f"tcp://{self.host}:{self._port}"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("AbciServer already started")
        self._stopped.clear()
        if self.path:
            self.refuse_if_served(self.path)
            old_umask = os.umask(0o177)  # 0600 from the bind on: no window for others
            try:  # a stale socket file a crash left is replaced
                self._server = await asyncio.start_unix_server(self._on_connection, self.path)
            finally:
                os.umask(old_umask)
            self._inode = os.stat(self.path).st_ino
        else:
            self._server = await asyncio.start_server(
                self._on_connection, self.host, self._port, reuse_address=True
            )
            sock = self._server.sockets[0]
            self._port = int(sock.getsockname()[1])
        log.info("ABCI server listening on %s", self.address)

    async def stop(self) -> None:
        """Stop listening and drop every connection; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
            if self.path:  # ours only: not one a later server bound there
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(self.path).st_ino == self._inode:
                        os.unlink(self.path)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Returns once ``stop()`` ran (also after a fatal application error)."""
        await self._stopped.wait()

    async def __aenter__(self) -> AbciServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- per-connection loop

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(writer)
        peer = writer.get_extra_info("peername")
        log.debug("ABCI connection from %s", peer)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("ABCI connection from %s lost: %s", peer, exc)
        except FramingError as exc:
            log.error("ABCI protocol error from %s: %s; closing connection", peer, exc)
        except _FatalAppError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug here must not pass silently either
            self._fail(exc)
        finally:
            self._writers.discard(writer)
            self._connections.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass
            log.debug("ABCI connection from %s closed", peer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests in order. Like CometBFT's own socket server, responses are
        held until a ``Flush`` is answered (CometBFT's client always sends one before it
        waits for an answer); unlike it, what a read brought is answered with one
        ``send``, not one per ``Flush``. CometBFT's client flushes after nearly every
        request (its flush timer is 20 ns: bench/README.md), so under load a read holds
        several request + ``Flush`` pairs (~6 on the mempool connection in
        ``bench.network``). Nothing answered waits for more input: a read that brought a
        ``Flush`` ends with a write, as does a voluntary yield after one, and
        ``_WRITE_AT`` bytes of answers are written whatever came."""
        decoder = FrameDecoder(self._max_message_bytes)
        handled = 0
        out: list[bytes] = []
        buffered = 0
        flush_due = False

        async def write_out() -> None:
            nonlocal buffered, flush_due
            writer.write(b"".join(out))
            out.clear()
            buffered = 0
            flush_due = False
            await writer.drain()

        while True:
            chunk = await reader.read(_READ_CHUNK)
            if not chunk:
                if decoder.buffered:
                    log.warning("ABCI peer closed mid-message (%d bytes)", decoder.buffered)
                return
            for payload in decoder.feed(chunk):
                try:
                    req = pb.Request.FromString(payload)
                except Exception as exc:  # google.protobuf DecodeError
                    raise FramingError(f"undecodable ABCI request: {exc}") from exc
                resp = self._handler.handle(req)
                data = _framed(resp)
                out.append(data)
                buffered += len(data)
                handled += 1
                flush_due = flush_due or resp.WhichOneof("value") == "flush"
                if buffered >= _WRITE_AT:
                    await write_out()
                if handled % _YIELD_EVERY == 0:
                    if flush_due:
                        await write_out()
                    await asyncio.sleep(0)  # let other connections progress
            if flush_due:
                await write_out()

    def _fail(self, exc: BaseException) -> None:
        if self.fatal_error is None:
            self.fatal_error = exc
            log.critical(
                "ABCI: FATAL application error, dropping all CometBFT connections so the "
                "node halts instead of diverging: %s",
                exc,
                exc_info=exc,
            )
        if self._fail_task is None:
            self._fail_task = asyncio.get_running_loop().create_task(self.stop())
