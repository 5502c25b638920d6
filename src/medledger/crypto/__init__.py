"""medledger.crypto"""
