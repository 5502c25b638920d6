"""Access policy: every authorization decision, as pure functions of ledger state.

Every node gives the same answer to the same question, and a node decrypts for a
caller only after one of these functions allowed it:

- ``roles``   the vocabulary (categories, labels, roles, ``Decision``, ``Caller``);
- ``consent`` which consent rules apply;
- ``scopes``  SMART v2 scopes (granted per principal kind, checked per resource type);
- ``read``    read, vread, history, search results and ``_include``, ``$everything``,
              ``$summary``; what a denied searcher is told (``withheld_view``);
- ``write``   write, overwrite, whom a node co-signs for, patient registration;
- ``admin``   consent and audit-log access, sealed export, share links, ``$match``,
              running the node;
- ``ledger``  the members-only ledger: blocks, tx and audit proofs, raw tx submission,
              blob replication.

The state machine enforces ``decide_write`` (and the signer rules of every tx kind)
when a tx is applied; the node asks these functions before it answers.
"""

from medledger.core.policy.admin import (
    decide_audit_read,
    decide_consent_change,
    decide_consent_read,
    decide_export,
    decide_match,
    decide_node_admin,
    decide_patient_self,
    decide_share_create,
    decide_share_list,
    decide_share_manage,
    decide_share_open,
)
from medledger.core.policy.consent import matching_consents
from medledger.core.policy.ledger import (
    MEMBERS_ONLY,
    decide_audit_proof,
    decide_blob_serving,
    decide_block,
    decide_tx_proof,
    decide_tx_submission,
    is_member,
    org_view,
    tx_subjects,
)
from medledger.core.policy.read import (
    NOT_VISIBLE,
    ORG_READS,
    WITHHELD_GENERIC,
    HistoryView,
    decide_everything,
    decide_history,
    decide_interaction,
    decide_read,
    decide_record,
    decide_search,
    may_see_patient,
    withheld_view,
)
from medledger.core.policy.roles import (
    ALL,
    BREAK_GLASS_MIN_REASON,
    CATEGORIES,
    DIRECTORY,
    LABEL_NAMES,
    ROLES,
    SENSITIVE_LABELS,
    SYSTEM,
    Caller,
    Decision,
    Role,
    may_write,
    role_covers,
)
from medledger.core.policy.scopes import (
    DEFAULT_SCOPES,
    parse_scopes,
    scope_allows,
    scope_denial,
)
from medledger.core.policy.write import (
    Writer,
    decide_registration,
    decide_write,
    decide_write_scope,
    decide_writer,
    org_writer,
    writer_role,
)

__all__ = [
    "ALL", "BREAK_GLASS_MIN_REASON", "CATEGORIES", "DEFAULT_SCOPES", "DIRECTORY", "LABEL_NAMES",
    "MEMBERS_ONLY", "NOT_VISIBLE", "ORG_READS", "ROLES", "SENSITIVE_LABELS", "SYSTEM",
    "WITHHELD_GENERIC",
    "Caller", "Decision", "HistoryView", "Role", "Writer", "decide_audit_proof",
    "decide_audit_read", "decide_blob_serving", "decide_block", "decide_consent_change",
    "decide_consent_read", "decide_everything", "decide_export", "decide_history",
    "decide_interaction", "decide_match", "decide_node_admin", "decide_patient_self",
    "decide_read", "decide_record", "decide_registration", "decide_search", "decide_share_create",
    "decide_share_list", "decide_share_manage",
    "decide_share_open", "decide_tx_proof", "decide_tx_submission",
    "decide_write", "decide_write_scope", "decide_writer", "is_member", "matching_consents",
    "may_see_patient", "may_write", "org_view", "org_writer", "parse_scopes", "role_covers",
    "scope_allows", "scope_denial", "tx_subjects", "withheld_view", "writer_role",
]
