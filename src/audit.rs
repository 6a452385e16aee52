//! The audit log: who did what, when — every admin write, every service-key write, and what
//! the command line does. Its own module so every domain records the same way, through the
//! one identity type ([`Caller`]).

use std::sync::Arc;

use serde_json::Value;

use crate::auth::{Actor, Caller};
use crate::store::{AuditRow, NewAudit, Store, StoreResult};

pub struct AuditLog {
    store: Arc<dyn Store>,
}

impl AuditLog {
    pub fn new(store: Arc<dyn Store>) -> Self {
        AuditLog { store }
    }

    /// Records what `caller` did.
    pub async fn record(
        &self,
        caller: &Caller,
        action: &str,
        target: Option<&str>,
        details: Value,
    ) {
        self.record_as(caller.actor(), action, target, details)
            .await
    }

    /// Records what `actor` did (when there is no caller yet, as at first-run setup). The change
    /// itself already happened: a failed append is logged loudly rather than turning a done
    /// change into an error.
    pub async fn record_as(
        &self,
        actor: Actor,
        action: &str,
        target: Option<&str>,
        details: Value,
    ) {
        let entry = NewAudit {
            actor_type: actor.kind.into(),
            actor_id: actor.id,
            action: action.into(),
            target: target.map(str::to_string),
            details,
        };
        if let Err(err) = self.store.append_audit(&entry).await {
            tracing::error!(error = ?err, action, "could not append to the audit log");
        }
    }

    /// Newest first: entries with `seq < before` when given.
    pub async fn list(&self, before: Option<i64>, limit: u32) -> StoreResult<Vec<AuditRow>> {
        self.store.list_audit(before, limit).await
    }
}
