//! Admin: the audit log, read by admins. Listing the log is itself audited (by the call's
//! own entry). The admin command line (`ern-registry admin ...`) records its actions in
//! the same chain, through `store::admin`.

use super::Services;
use super::{Call, ServiceError};
use crate::audit::Stored;
use crate::auth::{Principal, Role};
use crate::store::audit::AuditFilter;

/// One page of the audit log, oldest first, and the sequence number to continue after
/// (0 when this page is the last).
pub struct AuditPage {
    pub entries: Vec<Stored>,
    pub next_after_seq: u64,
}

/// The entries matching `filter` (at most `filter.limit`), for an admin.
pub async fn list_audit_entries(
    services: &Services,
    principal: &Principal,
    filter: &AuditFilter,
    call: &mut Call,
) -> Result<AuditPage, ServiceError> {
    principal.require_role(Role::Admin)?;
    let entries = services.store.audit_entries(filter).await?;
    call.items(entries.len());
    let next_after_seq = if i64::try_from(entries.len()).is_ok_and(|n| n == filter.limit) {
        entries.last().map_or(0, |e| e.seq as u64)
    } else {
        0
    };
    Ok(AuditPage {
        entries,
        next_after_seq,
    })
}
