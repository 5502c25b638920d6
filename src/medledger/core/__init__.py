"""The pure, deterministic core: transactions, ledger state, policy and the state machine.

Nothing here does I/O, reads a clock or draws randomness: time, entropy and the
state reader are arguments. The same core runs under the embedded block
producer and under CometBFT, so both produce the same state and app hashes.
"""
