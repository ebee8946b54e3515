//! RFC 6121 §3.1.3 (approving a subscription request) and XEP-0191
//! (blocking command): per-user authorization policy on the `roster` topic,
//! keyed by the user whose presence the policy protects.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::address::BareJid;
use crate::macros::string_enum;

string_enum! {
    /// What happens to a subscription request from a watcher who is on
    /// neither the user's blocked nor allowed list.
    pub enum DefaultPolicy {
        /// Approve without asking the user.
        Allow = "allow",
        /// Deny without asking the user.
        Block = "block",
        /// Ask the user.
        Ask = "ask",
    }
}

/// An entry of a blocked or allowed list: one user, or every user of a
/// domain.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PolicyItem {
    /// One user by bare address.
    User(BareJid),
    /// Every user whose bare address has this domain part.
    Domain(String),
}

/// A user added an entry to their blocked list (XEP-0191 §3.3); blocked
/// watchers see the user as unavailable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyBlocked {
    /// The user who blocks.
    pub user: BareJid,
    /// The blocked user or domain.
    pub item: PolicyItem,
}

/// A user removed an entry from their blocked list (XEP-0191 §3.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyUnblocked {
    /// The user who unblocks.
    pub user: BareJid,
    /// The unblocked user or domain.
    pub item: PolicyItem,
}

/// A user added an entry to their allowed list: its watchers are approved
/// without asking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyAllowed {
    /// The user who allows.
    pub user: BareJid,
    /// The allowed user or domain.
    pub item: PolicyItem,
}

/// A user removed an entry from their allowed list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyDisallowed {
    /// The user.
    pub user: BareJid,
    /// The user or domain no longer allowed.
    pub item: PolicyItem,
}

/// A user chose what happens to requests from watchers on neither list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyDefaultSet {
    /// The user.
    pub user: BareJid,
    /// The new default.
    pub default: DefaultPolicy,
}
