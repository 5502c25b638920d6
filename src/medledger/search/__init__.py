"""FHIR search: the R4 SearchParameter registry, value extraction, the node-local
encrypted index, query parsing and planning, and patient matching on blocking keys.

``registry`` and ``compartment`` hold the spec's data; ``extract`` turns a resource
into typed index values; ``index`` stores them (SQLCipher, ``<home>/index.db``);
``query`` parses a FHIR search into a plan; ``engine`` runs it for the node
(policy and decryption on the returned page only); ``matching`` serves ``$match``
and the duplicate check from blocking keys in the index.
"""
