"""medledger.core"""
