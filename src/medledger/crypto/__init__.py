"""Cryptography for medledger. Only this package touches primitives.

- ``canonical``: the one encoder for every byte that is signed or hashed.
- ``signing``: Ed25519 signatures (PyNaCl).
- ``envelope``: per-version AES-256-GCM encryption with X25519-wrapped data keys.
- ``merkle``: RFC 6962 Merkle trees and inclusion proofs.
- ``keys``: identities (Ed25519 + X25519 key pairs) and password-protected keystores.
"""
