"""The contract between a consensus driver and the ledger application.

Both drivers speak it: ``solo`` (the embedded, in-process block producer) and
``abci`` (CometBFT v0.38 over its ABCI socket). The application is the pure core
state machine plus storage; drivers only order transactions into blocks.

Rules every driver and application keep (CometBFT's, applied to both):
- ``finalize_block`` returns exactly one ``TxResult`` per tx, in order; an invalid
  tx is a non-zero code, never an exception.
- Block time comes from the block (``time_ns``), never from the clock.
- State becomes durable only in ``commit``; a crash before it replays the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class TxResult:
    code: int  # 0 = ok; otherwise medledger.errors.*.code
    log: str = ""
    data: bytes = b""
    events: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # (type, ((key, value), ...))


@dataclass(frozen=True)
class AppInfo:
    last_block_height: int
    last_block_app_hash: bytes
    version: str = "medledger/0.1.0"
    app_version: int = 1


@dataclass(frozen=True)
class BlockOutcome:
    tx_results: tuple[TxResult, ...]
    app_hash: bytes
    validator_updates: tuple[tuple[bytes, int], ...] = field(default=())  # (ed25519 pubkey, power)


@dataclass(frozen=True)
class QueryResult:
    code: int
    value: bytes = b""
    log: str = ""
    height: int = 0


class LedgerApplication(Protocol):
    """What a consensus driver calls. Implemented by ``medledger.node.ledger_app``."""

    def info(self) -> AppInfo: ...

    def init_chain(self, chain_id: str, app_state_bytes: bytes, time_ns: int) -> bytes:
        """Load genesis (organisations, validators); return the genesis app hash."""
        ...

    def check_tx(self, tx: bytes, recheck: bool) -> TxResult:
        """Cheap stateless + stateful validity check for the mempool."""
        ...

    def finalize_block(
        self, height: int, time_ns: int, txs: list[bytes], proposer: bytes, block_hash: bytes
    ) -> BlockOutcome:
        """Execute a decided block against pending state; return results and app hash."""
        ...

    def commit(self) -> int:
        """Persist the pending block; return retain height (0 = keep all)."""
        ...

    def query(self, path: str, data: bytes, height: int) -> QueryResult: ...
