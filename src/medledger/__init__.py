"""medledger: a permissioned blockchain for encrypted, audited, patient-controlled health
records."""

__version__ = "0.1.0"
