"""crypto.shamir: a patient identity split k-of-n with SLIP-39, shares sealed per guardian."""

from __future__ import annotations

import itertools

import pytest

from medledger.crypto import keys, shamir
from medledger.errors import Forbidden, IntegrityError, InvalidInput


def test_any_k_shares_recover_the_identity_and_k_minus_1_do_not() -> None:
    me = keys.new_identity("pat-1", "patient")
    shares = shamir.split_identity(me.sign_seed, me.enc_private, 3, 5)
    assert len(shares) == 5 and len(set(shares)) == 5
    for combo in itertools.combinations(shares, 3):
        assert shamir.combine_identity(list(combo)) == (me.sign_seed, me.enc_private)
    for combo in itertools.combinations(shares, 2):
        with pytest.raises(Forbidden, match="do not recover the key"):
            shamir.combine_identity(list(combo))


def test_a_tampered_or_foreign_share_is_detected() -> None:
    me, other = keys.new_identity("pat-1", "patient"), keys.new_identity("pat-2", "patient")
    mine = shamir.split_identity(me.sign_seed, me.enc_private, 2, 3)
    theirs = shamir.split_identity(other.sign_seed, other.enc_private, 2, 3)
    with pytest.raises(Forbidden):
        shamir.combine_identity([mine[0], theirs[1]])  # different split: refused
    words = mine[1].split()
    words[5] = "academic" if words[5] != "academic" else "acid"
    with pytest.raises(Forbidden):  # RS1024 checksum catches a changed word
        shamir.combine_identity([mine[0], " ".join(words)])


def test_shares_are_sealed_to_their_guardian_and_bound_to_ids() -> None:
    me = keys.new_identity("pat-1", "patient")
    g1, g2 = keys.new_identity("org-b", "org"), keys.new_identity("pat-2", "patient")
    words = shamir.split_identity(me.sign_seed, me.enc_private, 2, 2)
    sealed = shamir.seal_share(shamir.Share("pat-1", "org-b", words[0]), g1.enc_public)
    assert words[0].encode() not in sealed
    assert shamir.open_share(sealed, g1.enc_private, "pat-1", "org-b").mnemonic == words[0]
    with pytest.raises(Forbidden):  # another guardian's key does not open it
        shamir.open_share(sealed, g2.enc_private, "pat-1", "org-b")
    with pytest.raises(IntegrityError, match="claims to be org-b's share"):
        shamir.open_share(sealed, g1.enc_private, "pat-1", "pat-2")


def test_split_limits() -> None:
    me = keys.new_identity("pat-1", "patient")
    for k, n in ((1, 3), (4, 3), (2, 17)):
        with pytest.raises(InvalidInput):
            shamir.split_identity(me.sign_seed, me.enc_private, k, n)
