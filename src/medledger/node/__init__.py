"""medledger.node"""
