"""Is the network committing, and if not, which validators are missing?

Pure judgement over what CometBFT's RPC reports (``/status``, ``/validators``,
``/consensus_state``, ``/num_unconfirmed_txs``) plus how long ago this node last saw
the height move. The node's monitor (``node.network.ConsensusMonitor``) polls the RPC
and calls ``assess`` once a second.

A network is **not committing** when no block has been committed for ``stall_after_s``
while there is something to decide: txs wait in the mempool, or validators have voted
at the next height, or consensus has moved past round 0 (with empty blocks on, an idle
network still commits a block every second; with them off, an idle one casts no vote).
Note that without two thirds of the power voting CometBFT does not even leave round 0:
it waits at the prevote step. It has
**no quorum** when, in addition, the validators that cast a vote at the stuck height
(in any round) hold no more than two thirds of the voting power: the others are named.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STALL_AFTER_S", "Quorum", "Validator", "assess", "validator_address", "voted"]

STALL_AFTER_S = 4.0
_BITS_RE = re.compile(r"BA\{\d+:([x_]*)\}")
# CometBFT's RoundStepType: 4 Prevote, 5 PrevoteWait, 6 Precommit, 7 PrecommitWait
_PREVOTE_STEPS = (4, 5)
_PRECOMMIT_STEPS = (6, 7)


@dataclass(frozen=True)
class Validator:
    address: str  # upper-case hex, as CometBFT prints it
    power: int
    name: str = ""  # the organisation it belongs to, when known

    @property
    def label(self) -> str:
        return self.name or self.address[:12]


@dataclass(frozen=True)
class Quorum:
    committing: bool
    quorum: bool
    height: int
    round: int
    seconds_since_block: float
    waiting_txs: int
    missing: tuple[Validator, ...] = field(default=())
    voting_power: int = 0
    total_power: int = 0

    @property
    def reason(self) -> str:
        """Empty when committing; else a sentence for 503s, ``/readyz`` and ``net status``."""
        if self.committing:
            return ""
        stuck = (f"not committing: no block since height {self.height} for "
                 f"{self.seconds_since_block:.0f} s (round {self.round}, {self.waiting_txs} "
                 "txs waiting)")
        if self.quorum:
            return stuck
        names = ", ".join(v.label for v in self.missing) or "unknown"
        return (f"no quorum: validators not voting: {names} (voting power "
                f"{self.voting_power} of {self.total_power}, more than "
                f"{2 * self.total_power // 3} needed); {stuck}")

    def to_dict(self) -> dict[str, Any]:
        return {"committing": self.committing, "quorum": self.quorum, "height": self.height,
                "round": self.round, "seconds_since_block": round(self.seconds_since_block, 1),
                "waiting_txs": self.waiting_txs,
                "missing_validators": [v.label for v in self.missing],
                "voting_power": self.voting_power, "total_power": self.total_power,
                "reason": self.reason}


def validator_address(pub_key: bytes) -> str:
    """CometBFT's address of an Ed25519 validator key: SHA-256(pub)[:20], upper hex."""
    import hashlib

    return hashlib.sha256(pub_key).digest()[:20].hex().upper()


def voted(consensus_state: Mapping[str, Any]) -> tuple[int, int, set[int]]:
    """``(height, round, indices of validators seen voting)`` from ``/consensus_state``'s
    ``round_state``.

    Who counts as voting depends on the step the node is stuck at: at the prevote steps,
    those that prevoted in the current round; at the precommit steps, those that
    precommitted in it. A validator that prevoted and then died (the node waits for
    precommits that never come) is not counted. At the other steps (a round just began),
    anyone that voted at this height in any round counts."""
    rs = consensus_state.get("round_state", consensus_state)
    parts = [int(x) for x in str(rs.get("height/round/step", "0/0/0")).split("/")]
    height, rnd, step = (parts + [0, 0, 0])[:3]
    keys = (("prevotes_bit_array",) if step in _PREVOTE_STEPS else
            ("precommits_bit_array",) if step in _PRECOMMIT_STEPS else
            ("prevotes_bit_array", "precommits_bit_array"))
    current_round_only = step in _PREVOTE_STEPS or step in _PRECOMMIT_STEPS
    seen: set[int] = set()
    for votes in rs.get("height_vote_set") or []:
        if current_round_only and int(votes.get("round", -1)) != rnd:
            continue
        for key in keys:
            m = _BITS_RE.search(str(votes.get(key, "")))
            if m:
                seen.update(i for i, bit in enumerate(m.group(1)) if bit == "x")
    return height, rnd, seen


def assess(height: int, seconds_since_block: float, waiting_txs: int,
           validators: Sequence[Validator], consensus_state: Mapping[str, Any],
           stall_after_s: float = STALL_AFTER_S) -> Quorum:
    """Judge progress at ``height`` (the last committed one) from the RPC answers."""
    _, rnd, seen = voted(consensus_state)
    total = sum(v.power for v in validators)
    power = sum(v.power for i, v in enumerate(validators) if i in seen)
    # something to decide: txs wait, rounds have timed out, or votes were cast (without
    # two thirds of the power voting, CometBFT stays in round 0 at the prevote step)
    stalled = seconds_since_block >= stall_after_s and (waiting_txs > 0 or rnd > 0
                                                        or bool(seen))
    if not stalled:
        return Quorum(True, True, height, rnd, seconds_since_block, waiting_txs,
                      voting_power=power, total_power=total)
    quorum = 3 * power > 2 * total
    missing = tuple(v for i, v in enumerate(validators) if i not in seen)
    return Quorum(False, quorum, height, rnd, seconds_since_block, waiting_txs,
                  () if quorum else missing, power, total)
