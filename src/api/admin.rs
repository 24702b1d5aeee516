//! `AdminService`: the audit log, read by admins. Listing the log is itself audited.

use tonic::{Request, Response, Status};

use super::convert::{timestamp as timestamp_from_proto, timestamp_to_proto};
use super::{SharedState, audited, authorize};
use crate::auth::Role;
use crate::domain::FieldViolations;
use crate::proto::{self, admin_service_server::AdminService};
use crate::service::{Call, ServiceError, admin};
use crate::store::audit::AuditFilter;

/// Entries of one page when the request names no limit, and at most.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
/// Longest accepted filter text.
const MAX_FILTER: usize = 200;

pub struct AdminApi {
    state: SharedState,
}

impl AdminApi {
    pub fn new(state: SharedState) -> Self {
        AdminApi { state }
    }

    async fn list_audit_entries_inner(
        &self,
        request: Request<proto::ListAuditEntriesRequest>,
        call: &mut Call,
    ) -> Result<Response<proto::ListAuditEntriesResponse>, Status> {
        let principal = authorize(&self.state, &request, Role::Admin, call).await?;
        let req = request.into_inner();
        let mut v = FieldViolations::new();
        for (field, value) in [
            ("principal", &req.principal),
            ("method", &req.method),
            ("registry", &req.registry),
            ("outcome", &req.outcome),
        ] {
            if value.len() > MAX_FILTER {
                v.push(field, format!("at most {MAX_FILTER} bytes"));
            }
        }
        let mut time = |field: &str, t: &Option<prost_types::Timestamp>| match t {
            None => None,
            Some(t) => match timestamp_from_proto(t) {
                Some(t) => Some(t),
                None => {
                    v.push(field, "is not a valid timestamp");
                    None
                }
            },
        };
        let since = time("since", &req.since);
        let until = time("until", &req.until);
        if req.limit > MAX_PAGE {
            v.push("limit", format!("at most {MAX_PAGE}"));
        }
        v.into_result().map_err(ServiceError::from)?;
        let limit = if req.limit == 0 {
            DEFAULT_PAGE
        } else {
            req.limit
        };
        let filter = AuditFilter {
            principal: req.principal,
            method: req.method,
            registry: req.registry,
            outcome: req.outcome,
            since,
            until,
            after_seq: i64::try_from(req.after_seq).unwrap_or(i64::MAX),
            limit: i64::from(limit),
        };
        let page = admin::list_audit_entries(&self.state, &principal, &filter, call).await?;
        let next_after_seq = page.next_after_seq;
        let entries = page
            .entries
            .into_iter()
            .map(|s| proto::AuditEntry {
                seq: s.seq as u64,
                at: chrono::DateTime::from_timestamp_millis(s.at).map(timestamp_to_proto),
                principal: s.entry.principal,
                role: s.entry.role,
                centre: s.entry.centre,
                method: s.entry.method,
                registry: s.entry.registry,
                outcome: s.entry.outcome,
                items: s.entry.items,
                mac: s.mac,
                target: s.entry.target,
            })
            .collect();
        Ok(Response::new(proto::ListAuditEntriesResponse {
            entries,
            next_after_seq,
        }))
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_audit_entries(
        &self,
        request: Request<proto::ListAuditEntriesRequest>,
    ) -> Result<Response<proto::ListAuditEntriesResponse>, Status> {
        audited!(
            self,
            "AdminService/ListAuditEntries",
            list_audit_entries_inner,
            request
        )
    }
}
