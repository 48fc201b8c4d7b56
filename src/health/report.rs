//! What the last check of a backend said, for the status API: plain data
//! the probe task writes and anyone may read.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::config::Role;

/// The last check's reason for failing (`None` after a success) and the
/// role the server reported, if its kind reads one.
#[derive(Debug, Default)]
pub struct HealthReport {
    reason: Mutex<Option<String>>,
    /// 0 = not known, else a [`Role`] other than `Any`.
    role: AtomicU8,
}

impl HealthReport {
    /// Record a check: its failure reason (or `None`) and the role seen.
    pub fn record(&self, reason: Option<&str>, role: Option<Role>) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.as_deref() != reason {
            *r = reason.map(str::to_owned);
        }
        let code = match role {
            None | Some(Role::Any) => 0,
            Some(Role::Primary) => 1,
            Some(Role::Replica) => 2,
        };
        self.role.store(code, Ordering::Relaxed);
    }

    /// Why the last check failed; `None` after a success or before any.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The role the last successful check read.
    pub fn role(&self) -> Option<Role> {
        match self.role.load(Ordering::Relaxed) {
            1 => Some(Role::Primary),
            2 => Some(Role::Replica),
            _ => None,
        }
    }
}
