"""Privacy audits the operator (or anyone holding a run folder) can run: ``ledger_audit``
re-derives every merchant's ε from the ledger's mechanism facts with an independent
accountant and checks a merchant's own record against it; ``report`` renders the result
(table, ε plot, markdown report). Imports ``shared`` only, never ``client``."""

from server.audit.ledger_audit import (
    TOLERANCE_ABS,
    TOLERANCE_REL,
    AuditInputError,
    AuditReport,
    MerchantAudit,
    NodeStateAudit,
    audit_merchant,
    audit_node_state,
    audit_run,
    read_rows,
)

__all__ = [
    "TOLERANCE_ABS", "TOLERANCE_REL", "AuditInputError", "AuditReport", "MerchantAudit", "NodeStateAudit",
    "audit_merchant", "audit_node_state", "audit_run", "read_rows",
]
