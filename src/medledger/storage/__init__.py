"""Durable storage of the ledger (blocks, txs, state, audit index) and the node's local audit log.

``SqliteStore`` is the real thing; ``MemoryStore`` is its in-memory twin for tests.
Both implement ``Store``.
"""

from medledger.storage.sqlite import SqliteStore, Store

__all__ = ["SqliteStore", "Store"]
