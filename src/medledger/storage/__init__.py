"""medledger.storage"""
