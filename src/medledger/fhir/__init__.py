"""medledger.fhir"""
