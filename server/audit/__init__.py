"""Privacy audits the operator (or anyone holding a run folder) can run: ``ledger_audit``
re-derives every merchant's ε from the ledger's mechanism facts with an independent
accountant, ``checks`` asks whether those facts are possible and the run's, ``node_state``
checks a merchant's own record (and against the ledger); ``report`` renders the result
(table, ε plot, markdown report). Imports ``shared`` only, never ``client``."""

from server.audit.ledger_audit import (
    TOLERANCE_ABS,
    TOLERANCE_REL,
    UNDER_REPORT_TOLERANCE,
    AuditInputError,
    AuditReport,
    MerchantAudit,
    audit_merchant,
    audit_run,
    pld_allowance,
    read_rows,
)
from server.audit.node_state import NodeStateAudit, audit_node_state

__all__ = [
    "TOLERANCE_ABS", "TOLERANCE_REL", "UNDER_REPORT_TOLERANCE", "AuditInputError", "AuditReport", "MerchantAudit",
    "NodeStateAudit", "audit_merchant", "audit_node_state", "audit_run", "pld_allowance", "read_rows",
]
