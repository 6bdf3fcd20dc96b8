//! Pure authorisation policy: (identity, RPC, tenant) → allow / deny.
//!
//! A policy file maps caller identity patterns to roles, and roles to RPCs,
//! optionally narrowed to a list of tenants (`docs/policy.md`). Everything is
//! checked once, when the policy is loaded; [`Policy::allows`] then only
//! compares strings and bits. Deny by default: an identity that no grant
//! matches may call nothing.
//!
//! This module does no I/O apart from [`Policy::load`] reading the file, logs
//! nothing and knows nothing about gRPC: the service turns a `false` into
//! PERMISSION_DENIED naming the RPC, and audits it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};

use serde::Deserialize;

use crate::authn::{Caller, CertificateId};
use crate::vault::validate;

/// Every RPC the server answers, by service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rpc {
    // service Vault
    Seal,
    Unseal,
    GetMetadata,
    ListCredentials,
    Revoke,
    WatchRevocations,
    DeleteTenant,
    RestoreTenant,
    SetLegalHold,
    GetTenantStatus,
    // service Admin
    RotateKek,
    RotateTenantKey,
    RotateRootKey,
    GetKeyStatus,
    DestroyKeyVersion,
    GetRotationJob,
    QueryAudit,
    VerifyAudit,
    Backup,
    GetServerStatus,
}

impl Rpc {
    /// Every RPC, Vault service first, in declaration order.
    pub const ALL: [Rpc; 20] = [
        Rpc::Seal,
        Rpc::Unseal,
        Rpc::GetMetadata,
        Rpc::ListCredentials,
        Rpc::Revoke,
        Rpc::WatchRevocations,
        Rpc::DeleteTenant,
        Rpc::RestoreTenant,
        Rpc::SetLegalHold,
        Rpc::GetTenantStatus,
        Rpc::RotateKek,
        Rpc::RotateTenantKey,
        Rpc::RotateRootKey,
        Rpc::GetKeyStatus,
        Rpc::DestroyKeyVersion,
        Rpc::GetRotationJob,
        Rpc::QueryAudit,
        Rpc::VerifyAudit,
        Rpc::Backup,
        Rpc::GetServerStatus,
    ];

    /// The RPC's name as in the proto file and in policy files, e.g. `"Seal"`.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Seal => "Seal",
            Rpc::Unseal => "Unseal",
            Rpc::GetMetadata => "GetMetadata",
            Rpc::ListCredentials => "ListCredentials",
            Rpc::Revoke => "Revoke",
            Rpc::WatchRevocations => "WatchRevocations",
            Rpc::DeleteTenant => "DeleteTenant",
            Rpc::RestoreTenant => "RestoreTenant",
            Rpc::SetLegalHold => "SetLegalHold",
            Rpc::GetTenantStatus => "GetTenantStatus",
            Rpc::RotateKek => "RotateKek",
            Rpc::RotateTenantKey => "RotateTenantKey",
            Rpc::RotateRootKey => "RotateRootKey",
            Rpc::GetKeyStatus => "GetKeyStatus",
            Rpc::DestroyKeyVersion => "DestroyKeyVersion",
            Rpc::GetRotationJob => "GetRotationJob",
            Rpc::QueryAudit => "QueryAudit",
            Rpc::VerifyAudit => "VerifyAudit",
            Rpc::Backup => "Backup",
            Rpc::GetServerStatus => "GetServerStatus",
        }
    }

    /// Whether the RPC belongs to `service Admin` (else `service Vault`).
    /// The Admin RPCs are declared last, from `RotateKek` on.
    pub fn is_admin(self) -> bool {
        self >= Rpc::RotateKek
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl fmt::Display for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that is not the exact (case-sensitive) name of an [`Rpc`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown RPC {0:?}")]
pub struct UnknownRpc(pub String);

impl FromStr for Rpc {
    type Err = UnknownRpc;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Rpc::ALL
            .into_iter()
            .find(|rpc| rpc.name() == s)
            .ok_or_else(|| UnknownRpc(s.to_owned()))
    }
}

/// The names of the built-in roles, in the order the docs list them.
pub const BUILTIN_ROLES: [&str; 4] = ["executor", "ingest", "settings", "admin"];

const EXECUTOR: &[Rpc] = &[
    Rpc::Unseal,
    Rpc::GetMetadata,
    Rpc::ListCredentials,
    Rpc::WatchRevocations,
];
const INGEST: &[Rpc] = &[Rpc::Seal];
const SETTINGS: &[Rpc] = &[
    Rpc::Seal,
    Rpc::Revoke,
    Rpc::GetMetadata,
    Rpc::ListCredentials,
    Rpc::DeleteTenant,
    Rpc::RestoreTenant,
    Rpc::SetLegalHold,
    Rpc::GetTenantStatus,
    // Customers see who used their credentials: a grant narrowed to a
    // customer's tenants lets its settings UI query those tenants' records only.
    Rpc::QueryAudit,
];
/// Every Admin RPC (declared last in [`Rpc`]), and a tenant's lifecycle status
/// (operators follow deletions and shreds).
const ADMIN: &[Rpc] = &[
    Rpc::GetTenantStatus,
    Rpc::RotateKek,
    Rpc::RotateTenantKey,
    Rpc::RotateRootKey,
    Rpc::GetKeyStatus,
    Rpc::DestroyKeyVersion,
    Rpc::GetRotationJob,
    Rpc::QueryAudit,
    Rpc::VerifyAudit,
    Rpc::Backup,
    Rpc::GetServerStatus,
];

/// The RPCs of a built-in role, or `None` if `name` is not one.
pub fn builtin_role(name: &str) -> Option<&'static [Rpc]> {
    match name {
        "executor" => Some(EXECUTOR),
        "ingest" => Some(INGEST),
        "settings" => Some(SETTINGS),
        "admin" => Some(ADMIN),
        _ => None,
    }
}

/// The policy [`Policy::dev_default`] holds, as a file `credvault dev` can write.
pub const DEV_POLICY_TOML: &str = r#"# credvault dev policy: each built-in role for its own identity prefix, all tenants.
[[grant]]
identity = "spiffe://credvault/executor/*"
roles = ["executor"]

[[grant]]
identity = "spiffe://credvault/ingest/*"
roles = ["ingest"]

[[grant]]
identity = "spiffe://credvault/settings/*"
roles = ["settings"]

[[grant]]
identity = "spiffe://credvault/admin/*"
roles = ["admin"]
"#;

/// Why a policy could not be loaded. `grant` indexes count the `[[grant]]`
/// tables from 0, in file order.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy file could not be read.
    #[error("policy file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Not TOML, a missing or mistyped field, or an unknown field (the message
    /// names it, with its line and column).
    #[error("policy: {0}")]
    Parse(Box<toml::de::Error>),
    /// A grant's `identity` is empty.
    #[error("policy grant[{grant}].identity: must not be empty")]
    EmptyIdentity { grant: usize },
    /// A grant's `roles` list is empty, so it would grant nothing.
    #[error("policy grant[{grant}].roles: must name at least one role")]
    EmptyRoles { grant: usize },
    /// A grant names a role that is neither built in nor defined under `[roles]`.
    #[error("policy grant[{grant}].roles: unknown role {role:?}")]
    UnknownRole { grant: usize, role: String },
    /// A grant's `tenants` list is present but empty, so it would grant nothing.
    #[error("policy grant[{grant}].tenants: must not be empty (leave it out to mean all tenants)")]
    EmptyTenants { grant: usize },
    /// A tenant id in a grant is not 1-64 characters of `[A-Za-z0-9_-]`.
    #[error(
        "policy grant[{grant}].tenants: {tenant:?} is not a tenant id (1-64 characters of [A-Za-z0-9_-])"
    )]
    InvalidTenant { grant: usize, tenant: String },
    /// A custom role's name is not 1-64 characters of `[A-Za-z0-9_-]`.
    #[error("policy roles.{role:?}: role names are 1-64 characters of [A-Za-z0-9_-]")]
    InvalidRoleName { role: String },
    /// A custom role reuses the name of a built-in role.
    #[error("policy roles.{role}: {role:?} is a built-in role and cannot be redefined")]
    ShadowsBuiltin { role: String },
    /// A custom role's `rpcs` list is empty.
    #[error("policy roles.{role}.rpcs: must name at least one RPC")]
    EmptyRole { role: String },
    /// A custom role names an RPC that does not exist.
    #[error("policy roles.{role}.rpcs: unknown RPC {rpc:?}")]
    UnknownRpc { role: String, rpc: String },
}

/// A loaded, validated policy. Cheap to share; [`Policy::allows`] does no
/// allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    grants: Vec<Grant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    identity: Pattern,
    rpcs: RpcSet,
    /// `None`: every tenant, and RPCs that name no tenant.
    tenants: Option<BTreeSet<String>>,
}

/// The policy in force and the client certificates the CRL revokes,
/// replaceable while the server runs (`SIGHUP`, [`crate::server::reload`]):
/// every call is checked against those current when it is authorised, so a
/// reload takes effect for the next call, on connections already open too.
#[derive(Debug, Clone)]
pub struct SharedPolicy(Arc<RwLock<InForce>>);

#[derive(Debug)]
struct InForce {
    policy: Arc<Policy>,
    crl: Arc<CrlChecks>,
}

/// What the CRL in force refuses on every call, on connections opened before
/// it too (rustls checks a CRL only at the handshake).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrlChecks {
    /// The certificates it revokes.
    pub revoked: HashSet<CertificateId>,
    /// With `tls.refuse_stale_crl` only: per issuer (its DER name), the time
    /// (seconds since the Unix epoch) its CRL's "next update" promised a newer
    /// one; from then on, that issuer's certificates are refused.
    pub stale_at: HashMap<Vec<u8>, i64>,
}

impl SharedPolicy {
    /// `policy`, with `crl` checked on every call.
    pub fn new(policy: Policy, crl: CrlChecks) -> Self {
        Self(Arc::new(RwLock::new(InForce {
            policy: Arc::new(policy),
            crl: Arc::new(crl),
        })))
    }

    /// Whether `caller` may call `rpc` on `tenant` ([`Policy::allows`]) under
    /// what is in force now, its certificate checked against the CRL first.
    pub fn admits(&self, caller: &Caller, rpc: Rpc, tenant: Option<&str>) -> Admission {
        let in_force = self.0.read().unwrap_or_else(PoisonError::into_inner);
        let crl = &in_force.crl;
        if crl.revoked.contains(&caller.certificate) {
            Admission::Revoked
        } else if crl
            .stale_at
            .get(&caller.certificate.issuer)
            .is_some_and(|&at| unix_seconds() >= at)
        {
            Admission::StaleCrl
        } else if in_force.policy.allows(&caller.identity, rpc, tenant) {
            Admission::Allowed
        } else {
            Admission::Denied
        }
    }

    /// Puts `policy` and `crl` in force for every call authorised from now on.
    pub fn replace(&self, policy: Policy, crl: CrlChecks) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = InForce {
            policy: Arc::new(policy),
            crl: Arc::new(crl),
        };
    }
}

/// Seconds since the Unix epoch, as a CRL's times are.
fn unix_seconds() -> i64 {
    use crate::clock::Clock;
    (crate::clock::SystemClock.now_ms() / 1000) as i64
}

/// What [`SharedPolicy::admits`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// The policy does not allow the call.
    Denied,
    /// The CRL in force revokes the caller's certificate.
    Revoked,
    /// The CRL of the caller's issuer is past its next update, and
    /// `tls.refuse_stale_crl` is set.
    StaleCrl,
}

impl From<Arc<Policy>> for SharedPolicy {
    /// `policy`, with no certificate refused beyond what TLS refuses.
    fn from(policy: Arc<Policy>) -> Self {
        Self(Arc::new(RwLock::new(InForce {
            policy,
            crl: Arc::default(),
        })))
    }
}

/// The file as written; turned into a [`Policy`] by [`Policy::from_toml`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    grant: Vec<RawGrant>,
    #[serde(default)]
    roles: BTreeMap<String, RawRole>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    identity: String,
    roles: Vec<String>,
    tenants: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    rpcs: Vec<String>,
}

impl Policy {
    /// Parses and validates a policy (`docs/policy.md`).
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let raw: RawPolicy = toml::from_str(text).map_err(|e| PolicyError::Parse(Box::new(e)))?;

        let mut custom = BTreeMap::new();
        for (name, role) in raw.roles {
            let name_ok = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !name_ok {
                return Err(PolicyError::InvalidRoleName { role: name });
            }
            if builtin_role(&name).is_some() {
                return Err(PolicyError::ShadowsBuiltin { role: name });
            }
            if role.rpcs.is_empty() {
                return Err(PolicyError::EmptyRole { role: name });
            }
            let mut rpcs = RpcSet::default();
            for rpc in &role.rpcs {
                match rpc.parse::<Rpc>() {
                    Ok(rpc) => rpcs.insert(rpc),
                    Err(_) => {
                        return Err(PolicyError::UnknownRpc {
                            role: name,
                            rpc: rpc.clone(),
                        });
                    }
                }
            }
            custom.insert(name, rpcs);
        }

        let mut grants = Vec::with_capacity(raw.grant.len());
        for (index, grant) in raw.grant.into_iter().enumerate() {
            if grant.identity.is_empty() {
                return Err(PolicyError::EmptyIdentity { grant: index });
            }
            if grant.roles.is_empty() {
                return Err(PolicyError::EmptyRoles { grant: index });
            }
            let mut rpcs = RpcSet::default();
            for role in grant.roles {
                match builtin_role(&role) {
                    Some(builtin) => rpcs.extend(builtin),
                    None => match custom.get(&role) {
                        Some(set) => rpcs.union(*set),
                        None => return Err(PolicyError::UnknownRole { grant: index, role }),
                    },
                }
            }
            let tenants = match grant.tenants {
                None => None,
                Some(list) if list.is_empty() => {
                    return Err(PolicyError::EmptyTenants { grant: index });
                }
                Some(list) => {
                    if let Some(bad) = list.iter().find(|t| validate::tenant_id(t).is_err()) {
                        return Err(PolicyError::InvalidTenant {
                            grant: index,
                            tenant: bad.clone(),
                        });
                    }
                    Some(list.into_iter().collect())
                }
            };
            grants.push(Grant {
                identity: Pattern::new(&grant.identity),
                rpcs,
                tenants,
            });
        }
        Ok(Policy { grants })
    }

    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|error| PolicyError::Io {
            path: path.to_owned(),
            error,
        })?;
        Policy::from_toml(&text)
    }

    /// The development policy ([`DEV_POLICY_TOML`]): `spiffe://credvault/<role>/*`
    /// gets the built-in role `<role>` for every tenant, for each built-in role.
    pub fn dev_default() -> Policy {
        let grants = BUILTIN_ROLES
            .into_iter()
            .map(|role| Grant {
                identity: Pattern::new(&format!("spiffe://credvault/{role}/*")),
                rpcs: builtin_role(role).map(RpcSet::of).unwrap_or_default(),
                tenants: None,
            })
            .collect();
        Policy { grants }
    }

    /// How many grants it holds (for the log line of a reload).
    pub fn grant_count(&self) -> usize {
        self.grants.len()
    }

    /// Whether `identity` may call `rpc` on `tenant`. `tenant` is `None` for
    /// calls that name no tenant (vault-wide Admin RPCs); those are allowed
    /// only by grants without a `tenants` list. Deny by default.
    pub fn allows(&self, identity: &str, rpc: Rpc, tenant: Option<&str>) -> bool {
        self.grants.iter().any(|grant| {
            grant.rpcs.contains(rpc)
                && grant.identity.matches(identity)
                && match (&grant.tenants, tenant) {
                    (None, _) => true,
                    (Some(list), Some(t)) => list.contains(t),
                    (Some(_), None) => false,
                }
        })
    }
}

/// A set of RPCs, one bit each.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct RpcSet(u32);

impl RpcSet {
    fn of(rpcs: &[Rpc]) -> RpcSet {
        let mut set = RpcSet::default();
        set.extend(rpcs);
        set
    }

    fn insert(&mut self, rpc: Rpc) {
        self.0 |= rpc.bit();
    }

    fn extend(&mut self, rpcs: &[Rpc]) {
        rpcs.iter().for_each(|rpc| self.insert(*rpc));
    }

    fn union(&mut self, other: RpcSet) {
        self.0 |= other.0;
    }

    fn contains(self, rpc: Rpc) -> bool {
        self.0 & rpc.bit() != 0
    }
}

impl fmt::Debug for RpcSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(Rpc::ALL.iter().filter(|rpc| self.contains(**rpc)))
            .finish()
    }
}

/// An identity pattern: an exact string, or literal pieces separated by `*`,
/// each `*` matching any run of characters (including none, including `/`).
///
/// Matching is `prefix`, then each of `middle` at its leftmost place after the
/// previous one, then `suffix` at the very end. Taking the leftmost place is
/// never wrong for `*`-only patterns (a later place leaves less text for what
/// follows, never more), so nothing backtracks: each piece is one substring
/// search over the text, linear time with `str::find`'s two-way search.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Wildcard {
        prefix: String,
        /// The non-empty pieces between the first and last `*`.
        middle: Vec<String>,
        suffix: String,
    },
}

impl Pattern {
    fn new(pattern: &str) -> Pattern {
        match (pattern.find('*'), pattern.rfind('*')) {
            (Some(first), Some(last)) => Pattern::Wildcard {
                prefix: pattern[..first].to_owned(),
                middle: pattern[first + 1..last.max(first + 1)]
                    .split('*')
                    .filter(|piece| !piece.is_empty())
                    .map(str::to_owned)
                    .collect(),
                suffix: pattern[last + 1..].to_owned(),
            },
            _ => Pattern::Exact(pattern.to_owned()),
        }
    }

    fn matches(&self, text: &str) -> bool {
        match self {
            Pattern::Exact(exact) => exact == text,
            Pattern::Wildcard {
                prefix,
                middle,
                suffix,
            } => {
                // The prefix and suffix may not overlap: "a*a" does not match "a".
                if text.len() < prefix.len() + suffix.len()
                    || !text.starts_with(prefix.as_str())
                    || !text.ends_with(suffix.as_str())
                {
                    return false;
                }
                // Both ends are char boundaries: they end a matched prefix and
                // start a matched suffix.
                let mut rest = &text[prefix.len()..text.len() - suffix.len()];
                for piece in middle {
                    match rest.find(piece.as_str()) {
                        Some(at) => rest = &rest[at + piece.len()..],
                        None => return false,
                    }
                }
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matches(pattern: &str, text: &str) -> bool {
        Pattern::new(pattern).matches(text)
    }

    /// The textbook dynamic-programming glob matcher, as a reference.
    fn reference(pattern: &str, text: &str) -> bool {
        let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
        // m[i][j]: p[..i] matches t[..j]
        let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
        m[0][0] = true;
        for i in 1..=p.len() {
            for j in 0..=t.len() {
                m[i][j] = if p[i - 1] == '*' {
                    m[i - 1][j] || (j > 0 && m[i][j - 1])
                } else {
                    j > 0 && m[i - 1][j - 1] && p[i - 1] == t[j - 1]
                };
            }
        }
        m[p.len()][t.len()]
    }

    #[test]
    fn pattern_without_star_is_exact() {
        let p = "spiffe://credvault/executor/runner-7";
        assert!(matches(p, p));
        assert!(!matches(p, "spiffe://credvault/executor/runner-70"));
        assert!(!matches(p, "spiffe://credvault/executor/runner-"));
        assert!(!matches(p, "SPIFFE://credvault/executor/runner-7"));
        assert!(!matches(p, ""));
        assert!(!matches("a.b", "aXb"), "no character but * is special");
        assert!(!matches("a?b", "aXb"), "no character but * is special");
    }

    #[test]
    fn star_at_the_end() {
        let p = "spiffe://credvault/executor/*";
        assert!(matches(p, "spiffe://credvault/executor/runner-7"));
        assert!(
            matches(p, "spiffe://credvault/executor/a/b/c"),
            "* crosses /"
        );
        assert!(
            matches(p, "spiffe://credvault/executor/"),
            "empty remainder"
        );
        assert!(!matches(p, "spiffe://credvault/executor"));
        assert!(!matches(p, "spiffe://credvault/executorX/runner-7"));
        assert!(!matches(p, "spiffe://credvault/ingest/runner-7"));
        assert!(!matches(p, "xspiffe://credvault/executor/runner-7"));
    }

    #[test]
    fn star_at_the_start() {
        let p = "*.executors.example.com";
        assert!(matches(p, "runner-7.executors.example.com"));
        assert!(matches(p, ".executors.example.com"), "empty run");
        assert!(matches(p, "a.b.executors.example.com"));
        assert!(!matches(p, "runner-7.executors.example.com.evil"));
        assert!(!matches(p, "executors.example.com"));
    }

    #[test]
    fn star_in_the_middle() {
        let p = "spiffe://credvault/*/runner-7";
        assert!(matches(p, "spiffe://credvault/executor/runner-7"));
        assert!(matches(p, "spiffe://credvault/a/b/runner-7"));
        assert!(matches(p, "spiffe://credvault//runner-7"));
        assert!(
            !matches(p, "spiffe://credvault/runner-7"),
            "prefix and suffix overlap"
        );
        assert!(!matches(p, "spiffe://credvault/executor/runner-70"));
        assert!(!matches("a*a", "a"), "prefix and suffix overlap");
        assert!(matches("a*a", "aa"));
        assert!(matches("ab*ba", "abba"));
        assert!(!matches("ab*ba", "aba"));
    }

    #[test]
    fn several_stars() {
        assert!(matches("*", ""));
        assert!(matches("*", "anything/at/all"));
        assert!(matches("**", ""));
        assert!(matches("a**b", "ab"));
        assert!(matches("*a*", "a"));
        assert!(!matches("*a*", "bcd"));
        assert!(matches("*a*b*c*", "xaxbxcx"));
        assert!(matches("*a*b*c*", "abc"));
        assert!(!matches("*a*b*c*", "acb"));
        assert!(matches("a*b*c", "abbbc"));
        assert!(matches("a*bc*bc", "abcbcbc"));
        assert!(!matches("a*bc*bc", "abc"));
        // The first place a middle piece matches must not eat the suffix.
        assert!(matches("x*ab*ab", "xabab"));
        assert!(!matches("x*ab*ab", "xab"));
        assert!(matches(
            "spiffe://*/executor/*",
            "spiffe://credvault/executor/runner-7"
        ));
        assert!(!matches(
            "spiffe://*/executor/*",
            "spiffe://credvault/ingest/runner-7"
        ));
    }

    #[test]
    fn non_ascii_text_is_matched_by_characters() {
        assert!(matches("é*é", "éé"));
        assert!(matches("é*é", "éxé"));
        assert!(!matches("é*é", "é"));
        assert!(matches("*ü*", "aüb"));
    }

    #[test]
    fn pathological_input_is_matched_without_backtracking() {
        // Exponential for a naive backtracking matcher; one pass for this one.
        let text = "a".repeat(100_000);
        let pattern = format!("{}b", "*a".repeat(50));
        assert!(!matches(&pattern, &text));
        let pattern = format!("{}*", "a*".repeat(50));
        assert!(matches(&pattern, &text));
    }

    proptest! {
        #[test]
        fn matcher_agrees_with_reference(pattern in "[ab*]{0,8}", text in "[ab]{0,8}") {
            prop_assert_eq!(matches(&pattern, &text), reference(&pattern, &text));
        }

        #[test]
        fn pattern_matches_its_own_expansions(
            pieces in prop::collection::vec("[ab/]{0,4}", 1..5),
            fill in prop::collection::vec("[ab/*]{0,4}", 4),
        ) {
            let pattern = pieces.join("*");
            let mut text = pieces[0].clone();
            for (i, piece) in pieces[1..].iter().enumerate() {
                text.push_str(&fill[i]);
                text.push_str(piece);
            }
            prop_assert!(matches(&pattern, &text), "{} !~ {}", pattern, text);
        }
    }

    #[test]
    fn rpc_names_round_trip() {
        assert_eq!(Rpc::ALL.len(), 20);
        let names: BTreeSet<_> = Rpc::ALL.iter().map(|rpc| rpc.name()).collect();
        assert_eq!(names.len(), 20, "names are distinct");
        for rpc in Rpc::ALL {
            assert_eq!(rpc.name().parse::<Rpc>(), Ok(rpc));
            assert_eq!(format!("{rpc:?}"), rpc.name());
            assert_eq!(rpc.to_string(), rpc.name());
        }
        assert_eq!("seal".parse::<Rpc>(), Err(UnknownRpc("seal".into())));
        assert!("".parse::<Rpc>().is_err());
        assert!("Seal ".parse::<Rpc>().is_err());
    }

    #[test]
    fn admin_rpcs_are_the_admin_service() {
        let admin: Vec<Rpc> = Rpc::ALL.into_iter().filter(|rpc| rpc.is_admin()).collect();
        assert_eq!(admin.len(), 10);
        // The admin role: every Admin RPC, and GetTenantStatus of the Vault service.
        let role: Vec<Rpc> = std::iter::once(Rpc::GetTenantStatus).chain(admin).collect();
        assert_eq!(role, ADMIN);
        assert!(!Rpc::Seal.is_admin());
        assert!(!Rpc::SetLegalHold.is_admin());
        assert!(!Rpc::GetTenantStatus.is_admin());
        assert!(Rpc::RotateKek.is_admin());
        assert!(Rpc::Backup.is_admin());
        assert!(Rpc::GetServerStatus.is_admin());
    }

    /// What each built-in role may call, written out independently of the
    /// constants above.
    fn expected(role: &str, rpc: Rpc) -> bool {
        use Rpc::*;
        match role {
            "executor" => matches!(
                rpc,
                Unseal | GetMetadata | ListCredentials | WatchRevocations
            ),
            "ingest" => matches!(rpc, Seal),
            "settings" => matches!(
                rpc,
                Seal | Revoke
                    | GetMetadata
                    | ListCredentials
                    | DeleteTenant
                    | RestoreTenant
                    | SetLegalHold
                    | GetTenantStatus
                    | QueryAudit
            ),
            "admin" => rpc.is_admin() || rpc == GetTenantStatus,
            _ => unreachable!(),
        }
    }

    #[test]
    fn dev_default_role_by_rpc_matrix() {
        let policy = Policy::dev_default();
        let mut allowed = 0;
        for role in BUILTIN_ROLES {
            let identity = format!("spiffe://credvault/{role}/someone-1");
            for rpc in Rpc::ALL {
                for tenant in [Some("acme"), None] {
                    let want = expected(role, rpc);
                    assert_eq!(
                        policy.allows(&identity, rpc, tenant),
                        want,
                        "{role} {rpc} {tenant:?}"
                    );
                    allowed += usize::from(want);
                }
            }
        }
        // 4 + 1 + 9 + 11 allowed RPCs, each with and without a tenant.
        assert_eq!(allowed, 2 * 25);
    }

    #[test]
    fn dev_default_is_its_toml() {
        assert_eq!(
            Policy::from_toml(DEV_POLICY_TOML).unwrap(),
            Policy::dev_default()
        );
    }

    #[test]
    fn unknown_identities_are_denied() {
        let policy = Policy::dev_default();
        for identity in [
            "",
            "spiffe://credvault/executor",
            "spiffe://credvault/auditor/x",
            "spiffe://other/executor/runner-7",
            "executor",
            "runner-7.example.com",
            "SPIFFE://CREDVAULT/EXECUTOR/runner-7",
        ] {
            for rpc in Rpc::ALL {
                assert!(
                    !policy.allows(identity, rpc, Some("acme")),
                    "{identity:?} {rpc}"
                );
                assert!(!policy.allows(identity, rpc, None), "{identity:?} {rpc}");
            }
        }
    }

    #[test]
    fn an_empty_policy_denies_everything() {
        let policy = Policy::from_toml("").unwrap();
        for rpc in Rpc::ALL {
            assert!(!policy.allows("spiffe://credvault/admin/root", rpc, None));
        }
    }

    #[test]
    fn tenant_narrowing() {
        let policy = Policy::from_toml(
            r#"
            [[grant]]
            identity = "spiffe://credvault/executor/acme-*"
            roles = ["executor"]
            tenants = ["acme", "acme-eu"]

            [[grant]]
            identity = "spiffe://credvault/admin/acme-ops"
            roles = ["admin"]
            tenants = ["acme"]
            "#,
        )
        .unwrap();
        let exec = "spiffe://credvault/executor/acme-runner-1";
        assert!(policy.allows(exec, Rpc::Unseal, Some("acme")));
        assert!(policy.allows(exec, Rpc::Unseal, Some("acme-eu")));
        assert!(!policy.allows(exec, Rpc::Unseal, Some("globex")));
        assert!(!policy.allows(exec, Rpc::Unseal, Some("ACME")));
        assert!(!policy.allows(exec, Rpc::Unseal, Some("acm")));
        assert!(!policy.allows(exec, Rpc::Unseal, Some("")));
        assert!(!policy.allows(exec, Rpc::WatchRevocations, None));
        assert!(
            !policy.allows(exec, Rpc::Seal, Some("acme")),
            "not in the role"
        );

        // A tenant-scoped admin may rotate its tenant's key, nothing vault-wide.
        let ops = "spiffe://credvault/admin/acme-ops";
        assert!(policy.allows(ops, Rpc::RotateTenantKey, Some("acme")));
        assert!(policy.allows(ops, Rpc::QueryAudit, Some("acme")));
        assert!(!policy.allows(ops, Rpc::RotateTenantKey, Some("globex")));
        assert!(policy.allows(ops, Rpc::GetTenantStatus, Some("acme")));
        assert!(!policy.allows(ops, Rpc::GetTenantStatus, Some("globex")));
        assert!(!policy.allows(ops, Rpc::GetTenantStatus, None));
        assert!(!policy.allows(ops, Rpc::QueryAudit, None));
        assert!(!policy.allows(ops, Rpc::RotateKek, None));
        assert!(!policy.allows(ops, Rpc::Backup, None));
    }

    #[test]
    fn admits_checks_the_crl_first_then_the_policy_and_takes_replacements() {
        let caller = |identity: &str, serial: u8| Caller {
            identity: identity.into(),
            certificate: CertificateId {
                issuer: b"ca".to_vec(),
                serial: vec![serial],
            },
        };
        let executor = caller("spiffe://credvault/executor/a", 1);
        let leaked = caller("spiffe://credvault/executor/b", 2);
        let stranger = caller("spiffe://elsewhere/x", 3);
        let shared = SharedPolicy::new(
            Policy::dev_default(),
            CrlChecks {
                revoked: HashSet::from([leaked.certificate.clone()]),
                ..CrlChecks::default()
            },
        );
        let admits = |c: &Caller| shared.admits(c, Rpc::Unseal, Some("t"));
        assert_eq!(admits(&executor), Admission::Allowed);
        assert_eq!(
            admits(&leaked),
            Admission::Revoked,
            "allowed by policy, revoked by CRL"
        );
        assert_eq!(admits(&stranger), Admission::Denied);

        shared.replace(
            Policy::from_toml("").expect("empty policy"),
            CrlChecks::default(),
        );
        assert_eq!(
            admits(&executor),
            Admission::Denied,
            "the new policy is in force"
        );
        assert_eq!(
            admits(&leaked),
            Admission::Denied,
            "the new CRL is in force"
        );
    }

    #[test]
    fn a_stale_crl_refuses_its_issuers_certificates_only_once_it_is_stale() {
        let caller = |issuer: &[u8]| Caller {
            identity: "spiffe://credvault/executor/a".into(),
            certificate: CertificateId {
                issuer: issuer.to_vec(),
                serial: vec![1],
            },
        };
        let now = unix_seconds();
        let stale_at = HashMap::from([
            (b"stale-ca".to_vec(), now - 1),
            (b"fresh-ca".to_vec(), now + 3600),
        ]);
        let shared = SharedPolicy::new(
            Policy::dev_default(),
            CrlChecks {
                revoked: HashSet::from([caller(b"stale-ca").certificate]),
                stale_at,
            },
        );
        let admits = |issuer: &[u8]| shared.admits(&caller(issuer), Rpc::Unseal, Some("t"));
        assert_eq!(
            admits(b"stale-ca"),
            Admission::Revoked,
            "revoked comes first"
        );
        let other = Caller {
            certificate: CertificateId {
                issuer: b"stale-ca".to_vec(),
                serial: vec![2],
            },
            ..caller(b"stale-ca")
        };
        assert_eq!(
            shared.admits(&other, Rpc::Unseal, Some("t")),
            Admission::StaleCrl
        );
        assert_eq!(admits(b"fresh-ca"), Admission::Allowed);
        assert_eq!(admits(b"no-crl-ca"), Admission::Allowed, "left to TLS");
    }

    #[test]
    fn grants_add_up() {
        let policy = Policy::from_toml(
            r#"
            [[grant]]
            identity = "spiffe://credvault/settings/ui"
            roles = ["settings"]
            tenants = ["acme"]

            [[grant]]
            identity = "spiffe://credvault/*/ui"
            roles = ["ingest", "executor"]
            "#,
        )
        .unwrap();
        let ui = "spiffe://credvault/settings/ui";
        assert!(policy.allows(ui, Rpc::Revoke, Some("acme")));
        assert!(!policy.allows(ui, Rpc::Revoke, Some("globex")));
        assert!(policy.allows(ui, Rpc::Seal, Some("globex")), "second grant");
        assert!(
            policy.allows(ui, Rpc::Unseal, Some("globex")),
            "second grant"
        );
        assert!(!policy.allows(ui, Rpc::RotateKek, None));
    }

    #[test]
    fn custom_role() {
        let policy = Policy::from_toml(
            r#"
            [roles.auditor]
            rpcs = ["GetMetadata", "ListCredentials", "QueryAudit", "VerifyAudit"]

            [[grant]]
            identity = "spiffe://credvault/auditor/*"
            roles = ["auditor"]
            "#,
        )
        .unwrap();
        let id = "spiffe://credvault/auditor/alice";
        for rpc in Rpc::ALL {
            let want = matches!(
                rpc,
                Rpc::GetMetadata | Rpc::ListCredentials | Rpc::QueryAudit | Rpc::VerifyAudit
            );
            assert_eq!(policy.allows(id, rpc, Some("acme")), want, "{rpc}");
            assert_eq!(policy.allows(id, rpc, None), want, "{rpc}");
        }
    }

    #[test]
    fn example_policy_loads() {
        let policy = Policy::from_toml(include_str!("../examples/policy.toml")).unwrap();
        let runner = "spiffe://credvault/executor/acme/runner-7";
        assert!(policy.allows(runner, Rpc::Unseal, Some("acme")));
        assert!(!policy.allows(runner, Rpc::Unseal, Some("globex")));
        assert!(!policy.allows(runner, Rpc::Seal, Some("acme")));
        let shared = "spiffe://credvault/executor/shared/runner-1";
        assert!(policy.allows(shared, Rpc::Unseal, Some("globex")));
        let ui = "spiffe://credvault/settings/web";
        assert!(policy.allows(ui, Rpc::DeleteTenant, Some("globex")));
        let auditor = "spiffe://credvault/auditor/security-team";
        assert!(policy.allows(auditor, Rpc::VerifyAudit, None));
        assert!(!policy.allows(auditor, Rpc::Unseal, Some("acme")));
        let rotation = "spiffe://credvault/admin/rotation";
        assert!(policy.allows(rotation, Rpc::RotateKek, None));
        assert!(!policy.allows(rotation, Rpc::Unseal, Some("acme")));
        assert!(!policy.allows(
            "spiffe://credvault/unknown/x",
            Rpc::GetMetadata,
            Some("acme")
        ));
    }

    #[test]
    fn load_reads_a_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, DEV_POLICY_TOML).unwrap();
        assert_eq!(Policy::load(&path).unwrap(), Policy::dev_default());

        let missing = dir.path().join("missing.toml");
        let err = Policy::load(&missing).unwrap_err();
        assert!(matches!(err, PolicyError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    /// Loads `text`, expecting an error whose message contains `needle`.
    fn load_error(text: &str, needle: &str) -> PolicyError {
        let err = Policy::from_toml(text).expect_err(text);
        assert!(err.to_string().contains(needle), "{err:?} / {err}");
        err
    }

    const GRANT_OK: &str =
        "[[grant]]\nidentity = \"spiffe://credvault/x/*\"\nroles = [\"ingest\"]\n";

    #[test]
    fn unknown_fields_are_errors() {
        // A misspelled field would otherwise silently widen or void a grant.
        let err = load_error(&format!("{GRANT_OK}tenant = [\"acme\"]\n"), "tenant");
        assert!(matches!(err, PolicyError::Parse(_)));
        let err = load_error(&format!("{GRANT_OK}\n[[grants]]\n"), "grants");
        assert!(matches!(err, PolicyError::Parse(_)));
        let err = load_error("[roles.auditor]\nrpcs = [\"Seal\"]\nrpc = []\n", "rpc");
        assert!(matches!(err, PolicyError::Parse(_)));
        let err = load_error("version = 1\n", "version");
        assert!(matches!(err, PolicyError::Parse(_)));
    }

    #[test]
    fn malformed_toml_and_missing_fields_are_errors() {
        let err = load_error("[[grant]\n", "policy");
        assert!(matches!(err, PolicyError::Parse(_)));
        let err = load_error("[[grant]]\nroles = [\"ingest\"]\n", "identity");
        assert!(matches!(err, PolicyError::Parse(_)));
        let err = load_error("[[grant]]\nidentity = \"x\"\n", "roles");
        assert!(matches!(err, PolicyError::Parse(_)));
        let err = load_error("[[grant]]\nidentity = \"x\"\nroles = \"ingest\"\n", "roles");
        assert!(matches!(err, PolicyError::Parse(_)));
        let err = load_error("[roles.auditor]\n", "rpcs");
        assert!(matches!(err, PolicyError::Parse(_)));
    }

    #[test]
    fn empty_identity_is_an_error() {
        let text = format!("{GRANT_OK}\n[[grant]]\nidentity = \"\"\nroles = [\"executor\"]\n");
        let err = load_error(&text, "grant[1].identity");
        assert!(matches!(err, PolicyError::EmptyIdentity { grant: 1 }));
    }

    #[test]
    fn unknown_role_is_an_error() {
        let text = format!(
            "{GRANT_OK}\n[[grant]]\nidentity = \"a\"\nroles = [\"executor\", \"auditr\"]\n"
        );
        let err = load_error(&text, "grant[1].roles");
        assert!(
            matches!(&err, PolicyError::UnknownRole { grant: 1, role } if role == "auditr"),
            "{err:?}"
        );
        // Role names are case-sensitive.
        let err = load_error(
            "[[grant]]\nidentity = \"a\"\nroles = [\"Admin\"]\n",
            "\"Admin\"",
        );
        assert!(matches!(err, PolicyError::UnknownRole { grant: 0, .. }));
    }

    #[test]
    fn empty_lists_are_errors() {
        let err = load_error(
            "[[grant]]\nidentity = \"a\"\nroles = []\n",
            "grant[0].roles",
        );
        assert!(matches!(err, PolicyError::EmptyRoles { grant: 0 }));
        let err = load_error(&format!("{GRANT_OK}tenants = []\n"), "grant[0].tenants");
        assert!(matches!(err, PolicyError::EmptyTenants { grant: 0 }));
        let err = load_error("[roles.auditor]\nrpcs = []\n", "roles.auditor.rpcs");
        assert!(matches!(err, PolicyError::EmptyRole { .. }));
    }

    #[test]
    fn invalid_tenants_are_errors() {
        let long = "a".repeat(65);
        for bad in [
            "",
            "acme corp",
            "acme/eu",
            "acme.eu",
            "*",
            "ä",
            long.as_str(),
        ] {
            let text = format!("{GRANT_OK}tenants = [\"acme\", {bad:?}]\n");
            let err = load_error(&text, "grant[0].tenants");
            assert!(
                matches!(&err, PolicyError::InvalidTenant { grant: 0, tenant } if tenant == bad),
                "{err:?}"
            );
        }
        let ok = "a".repeat(64);
        let text = format!("{GRANT_OK}tenants = [\"A-z_0\", {ok:?}]\n");
        assert!(Policy::from_toml(&text).is_ok());
    }

    #[test]
    fn unknown_rpc_is_an_error() {
        let err = load_error(
            "[roles.auditor]\nrpcs = [\"GetMetadata\", \"seal\"]\n",
            "roles.auditor.rpcs",
        );
        assert!(
            matches!(&err, PolicyError::UnknownRpc { role, rpc } if role == "auditor" && rpc == "seal"),
            "{err:?}"
        );
        let err = load_error("[roles.auditor]\nrpcs = [\"Health\"]\n", "\"Health\"");
        assert!(matches!(err, PolicyError::UnknownRpc { .. }));
    }

    #[test]
    fn custom_roles_cannot_shadow_built_in_ones() {
        for role in BUILTIN_ROLES {
            let text = format!("[roles.{role}]\nrpcs = [\"Seal\"]\n");
            let err = load_error(&text, "built-in");
            assert!(
                matches!(&err, PolicyError::ShadowsBuiltin { role: r } if r == role),
                "{err:?}"
            );
        }
    }

    #[test]
    fn custom_role_names_are_checked() {
        let err = load_error("[roles.\"\"]\nrpcs = [\"Seal\"]\n", "roles");
        assert!(matches!(err, PolicyError::InvalidRoleName { .. }));
        let err = load_error("[roles.\"read only\"]\nrpcs = [\"Seal\"]\n", "read only");
        assert!(matches!(err, PolicyError::InvalidRoleName { .. }));
    }
}
