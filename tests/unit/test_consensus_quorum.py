"""consensus.quorum: judging progress and naming missing validators from RPC answers."""

from __future__ import annotations

from medledger.consensus import quorum
from medledger.consensus.quorum import Validator

VALS = [Validator("AA", 10, "org-1"), Validator("BB", 10, "org-2"),
        Validator("CC", 10, "org-3"), Validator("DD", 10, "")]


def _cs(height: int, rnd: int, rounds: list[tuple[str, str]], step: int = 1
        ) -> dict[str, object]:
    """A ``/consensus_state`` answer as CometBFT v0.38 prints it."""
    return {"round_state": {
        "height/round/step": f"{height}/{rnd}/{step}",
        "height_vote_set": [{"round": i, "prevotes_bit_array": f"BA{{4:{pv}}} 0/40 = 0.00",
                             "precommits_bit_array": f"BA{{4:{pc}}} 0/40 = 0.00"}
                            for i, (pv, pc) in enumerate(rounds)]}}


def test_recent_block_is_committing_even_with_votes_missing() -> None:
    q = quorum.assess(9, 1.0, 5, VALS, _cs(10, 0, [("x___", "____")]))
    assert q.committing and q.quorum and q.reason == ""


def test_idle_network_at_round_zero_is_not_stalled() -> None:
    # empty blocks off, no txs: nothing to decide, so no block is expected
    q = quorum.assess(9, 60.0, 0, VALS, _cs(10, 0, [("____", "____")]))
    assert q.committing


def test_two_of_four_silent_stuck_in_round_zero_is_no_quorum() -> None:
    # what CometBFT shows with two of four validators down: round 0, prevote step, forever
    q = quorum.assess(9, 6.0, 0, VALS, _cs(10, 0, [("x_x_", "____")]))
    assert not q.committing and not q.quorum
    assert [v.label for v in q.missing] == ["org-2", "DD"]


def test_two_of_four_silent_is_no_quorum_naming_them() -> None:
    cs = _cs(10, 3, [("xx__", "xx__"), ("x___", "____"), ("_x__", "____"), ("____", "____")])
    q = quorum.assess(9, 12.0, 0, VALS, cs)
    assert not q.committing and not q.quorum
    assert [v.label for v in q.missing] == ["org-3", "DD"]
    assert (q.voting_power, q.total_power) == (20, 40)
    assert q.reason.startswith("no quorum: validators not voting: org-3, DD")
    assert q.to_dict()["missing_validators"] == ["org-3", "DD"]


def test_validators_that_prevoted_then_died_are_missing_at_the_precommit_step() -> None:
    # two of four killed one after the other: the second had prevoted at the stuck height,
    # so prevotes hold 3 of 4, but the node waits at the precommit step for votes that
    # never come (the CI failure of 2 December: it was judged "not committing, quorum")
    q = quorum.assess(9, 6.0, 1, VALS, _cs(10, 0, [("xx_x", "xx__")], step=6))
    assert not q.committing and not q.quorum
    assert [v.label for v in q.missing] == ["org-3", "DD"]


def test_prevote_step_counts_only_the_current_round() -> None:
    cs = _cs(10, 2, [("xxxx", "xx__"), ("xx__", "____"), ("x_x_", "____")], step=4)
    q = quorum.assess(9, 12.0, 0, VALS, cs)
    assert not q.quorum and [v.label for v in q.missing] == ["org-2", "DD"]


def test_everyone_precommitting_is_stalled_with_quorum() -> None:
    q = quorum.assess(9, 8.0, 40, VALS, _cs(10, 0, [("xxxx", "xxx_")], step=7))
    assert not q.committing and q.quorum and q.missing == ()


def test_slow_but_everyone_voting_is_stalled_with_quorum() -> None:
    q = quorum.assess(9, 8.0, 40, VALS, _cs(10, 1, [("xxx_", "xx__"), ("___x", "____")]))
    assert not q.committing and q.quorum and q.missing == ()
    assert q.reason.startswith("not committing: no block since height 9")


def test_validator_address_is_cometbft_s() -> None:
    # CometBFT: address = SHA-256(ed25519 pubkey)[:20], printed upper-case hex
    import hashlib
    pub = bytes(range(32))
    assert quorum.validator_address(pub) == hashlib.sha256(pub).digest()[:20].hex().upper()
