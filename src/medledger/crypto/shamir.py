"""Key-recovery shares: a patient's key split k-of-n (SLIP-39), each share sealed to one
guardian (ADR 7).

The secret is the patient's whole identity, ``sign_seed ‖ enc_private`` (64 bytes),
split with Trezor's ``shamir-mnemonic``, the reference implementation of SLIP-39: one
group, ``threshold`` of ``n`` member shares, each a checksummed word list (RS1024), and a
digest inside the shared secret so that a wrong or missing share is *detected* at
recovery instead of yielding a wrong key. A share is sealed (X25519 sealed box) to its
guardian's key together with the patient and guardian ids, so it cannot be passed off as
another patient's or guardian's share; at recovery a guardian re-seals it to the fresh
key of the request, never revealing it to the node in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import shamir_mnemonic
from shamir_mnemonic import MnemonicError

from medledger.crypto import envelope
from medledger.crypto.canonical import canonical, loads
from medledger.errors import Forbidden, IntegrityError, InvalidInput, MedledgerError

SCHEME = "slip39-v1"
SECRET_BYTES = 64


@dataclass(frozen=True)
class Share:
    patient: str
    guardian: str
    mnemonic: str  # SLIP-39 words (one member share)


def split_identity(sign_seed: bytes, enc_private: bytes, threshold: int, n: int) -> list[str]:
    """``n`` SLIP-39 mnemonics, any ``threshold`` of which give the identity back."""
    if not 2 <= threshold <= n <= 16:
        raise InvalidInput(f"key recovery needs a threshold of 2 to {n} guardians (no guardian "
                           "may recover alone) and at most 16 guardians")
    secret = sign_seed + enc_private
    if len(secret) != SECRET_BYTES:
        raise InvalidInput("an identity is a 32-byte signing seed and a 32-byte X25519 key")
    # iteration_exponent 0: the passphrase is empty; confidentiality comes from sealing
    groups = shamir_mnemonic.generate_mnemonics(1, [(threshold, n)], secret, b"",
                                                extendable=True, iteration_exponent=0)
    return list(groups[0])


def combine_identity(mnemonics: list[str]) -> tuple[bytes, bytes]:
    """(sign_seed, enc_private) from enough shares; ``Forbidden`` naming why if not."""
    try:
        secret = shamir_mnemonic.combine_mnemonics(mnemonics)
    except MnemonicError as exc:
        raise Forbidden(f"the shares do not recover the key: {exc}") from exc
    if len(secret) != SECRET_BYTES:
        raise IntegrityError("the recovered secret is not an identity")
    return secret[:32], secret[32:]


def seal_share(share: Share, reader_public: bytes) -> bytes:
    """A share sealed to ``reader_public`` (the guardian's, or a recovery request's key)."""
    doc = {"v": 1, "scheme": SCHEME, "patient": share.patient, "guardian": share.guardian,
           "mnemonic": share.mnemonic}
    return envelope.seal_to(canonical(doc), reader_public)


def open_share(sealed: bytes, reader_private: bytes, patient: str, guardian: str) -> Share:
    """Open a sealed share and check it is ``guardian``'s share of ``patient``'s key."""
    try:
        doc = loads(envelope.open_sealed_box(sealed, reader_private))
    except MedledgerError as exc:
        raise Forbidden("this sealed share is not for this key") from exc
    if not isinstance(doc, dict) or doc.get("scheme") != SCHEME or not isinstance(
            doc.get("mnemonic"), str):
        raise IntegrityError("a sealed share has an unknown format")
    if (doc.get("patient"), doc.get("guardian")) != (patient, guardian):
        raise IntegrityError(f"a sealed share claims to be {doc.get('guardian')}'s share of "
                             f"{doc.get('patient')}'s key, not {guardian}'s of {patient}'s")
    return Share(patient, guardian, doc["mnemonic"])
