"""medledger.consensus"""
