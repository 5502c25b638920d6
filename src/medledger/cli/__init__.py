"""medledger.cli"""
