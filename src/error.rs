//! The library's errors. Each has a stable machine-readable reason
//! ([`Error::reason`]) that the gRPC layer turns into a status an executor can
//! act on. No error ever carries secret bytes or key material, and a
//! decryption failure never says why.

use crate::crypto::DecryptionFailed;
use crate::crypto::root::RootKeyError;
use crate::store::StoreError;

/// Bad input: rejected before anything is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("tenant id must be 1-64 characters of [A-Za-z0-9_-]")]
    TenantId,
    #[error("credential id must be 1-256 characters of [A-Za-z0-9._:/@-]")]
    CredentialId,
    #[error("secret is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("{count} labels; at most {limit} are allowed")]
    TooManyLabels { count: usize, limit: usize },
    #[error("label keys must be 1-63 characters of [A-Za-z0-9._/-]")]
    LabelKey,
    #[error("label values must be at most 256 characters")]
    LabelValue,
    #[error("unknown credential kind")]
    Kind,
    #[error("version must be at least 1")]
    Version,
    #[error("expires_at is not in the future")]
    Expiry,
    #[error("{field} must be at most {limit} characters")]
    TooLong { field: &'static str, limit: usize },
    #[error("page token is malformed")]
    PageToken,
    #[error(
        "layer must be \"kek\" or \"dek\" (root keys are not kept in the store: destroy a retired root key file yourself)"
    )]
    KeyLayer,
    #[error("job id is malformed")]
    JobId,
    #[error("the grace period is at most 30 days")]
    Grace,
    #[error("an audit head is a sequence number from 1 and a MAC of 32 bytes")]
    AuditHead,
}

impl Invalid {
    /// The stable reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            Invalid::TenantId | Invalid::CredentialId => "INVALID_ID",
            Invalid::TooLarge { .. } => "TOO_LARGE",
            Invalid::TooManyLabels { .. } => "TOO_MANY_LABELS",
            Invalid::LabelKey | Invalid::LabelValue => "INVALID_LABEL",
            Invalid::Kind => "INVALID_KIND",
            Invalid::Version => "INVALID_VERSION",
            Invalid::Expiry => "INVALID_EXPIRY",
            Invalid::TooLong { .. } => "TOO_LONG",
            Invalid::PageToken => "INVALID_PAGE_TOKEN",
            Invalid::KeyLayer => "INVALID_LAYER",
            Invalid::JobId => "INVALID_ID",
            Invalid::Grace => "INVALID_GRACE",
            Invalid::AuditHead => "INVALID_AUDIT_HEAD",
        }
    }
}

/// Everything a vault operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing was stored.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// No such credential or version (also what another tenant sees).
    #[error("credential not found")]
    NotFound,
    /// The credential was revoked.
    #[error("credential has been revoked")]
    Revoked,
    /// The credential's expiry time has passed.
    #[error("credential has expired")]
    Expired,
    /// The tenant was deleted.
    #[error("tenant has been deleted")]
    TenantDeleted,
    /// Compare-and-set failed: the current version is not the expected one.
    #[error("expected version {expected}, but the current version is {actual}")]
    VersionMismatch { expected: u32, actual: u32 },
    /// A ciphertext did not open. Deliberately says nothing more.
    #[error("decryption failed")]
    DecryptionFailed,
    /// The root key given at start-up is not the one this store was made with.
    #[error(
        "the root key does not match this data directory (its check value does not open): start with the root key the store was created with"
    )]
    WrongRootKey,
    /// The tenant is not deleted (so there is nothing to restore).
    #[error("tenant is not deleted")]
    TenantNotDeleted,
    /// The tenant has been crypto-shredded (or its shred has begun): its keys
    /// are destroyed, and nothing of it can be restored.
    #[error("tenant has been shredded; its keys are destroyed")]
    TenantShredded,
    /// Events after this sequence number were pruned: the watcher must resync.
    #[error(
        "events after sequence {after} were pruned (the oldest kept is {oldest}); resync: re-read what you hold, then watch from the current sequence"
    )]
    EventsPruned { after: u64, oldest: u64 },
    /// The root key given at start-up is the one a root rotation retired.
    #[error(
        "this is the retired root key; the store was rotated to root key v{current}: start with the new root key"
    )]
    RetiredRootKey { current: u32 },
    /// A key version cannot be destroyed while records depend on it.
    #[error("{layer} v{version} still protects {count} {what}; {hint}")]
    KeyInUse {
        layer: &'static str,
        version: u32,
        count: u64,
        what: &'static str,
        hint: &'static str,
    },
    /// The primary version of a ring cannot be destroyed.
    #[error("{layer} v{version} is the primary version and cannot be destroyed; rotate first")]
    PrimaryKey { layer: &'static str, version: u32 },
    /// No such key version (or tenant).
    #[error("no such key version")]
    KeyNotFound,
    /// No such rotation job.
    #[error("no such rotation job")]
    JobNotFound,
    /// A root rotation was given the root key in use, or a retired one.
    #[error(
        "the new root key is the one in use or a retired one; generate a new one (credvault keygen)"
    )]
    SameRootKey,
    /// The audit record could not be written: the call fails closed.
    #[error("the audit record could not be written; the call was refused")]
    AuditUnavailable,
    /// The audit log failed (query, verify, prune).
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// The root key could not be loaded.
    #[error(transparent)]
    RootKey(#[from] RootKeyError),
    /// Concurrent writers kept conflicting; the caller may retry.
    #[error("too many concurrent changes to this credential; retry")]
    Contention,
    /// A backup or restore failed.
    #[error(transparent)]
    Backup(#[from] crate::vault::backup::BackupError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store holds something it should not (a bug or tampering).
    #[error("store is inconsistent: {0}")]
    Corrupt(String),
}

impl From<DecryptionFailed> for Error {
    fn from(_: DecryptionFailed) -> Self {
        Error::DecryptionFailed
    }
}

impl Error {
    /// The stable, machine-readable reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Invalid(invalid) => invalid.reason(),
            Error::NotFound => "NOT_FOUND",
            Error::Revoked => "REVOKED",
            Error::Expired => "EXPIRED",
            Error::TenantDeleted => "TENANT_DELETED",
            Error::VersionMismatch { .. } => "VERSION_MISMATCH",
            Error::DecryptionFailed => "DECRYPTION_FAILED",
            Error::WrongRootKey | Error::RetiredRootKey { .. } => "WRONG_ROOT_KEY",
            Error::KeyInUse { .. } => "KEY_IN_USE",
            Error::TenantNotDeleted => "TENANT_NOT_DELETED",
            Error::TenantShredded => "TENANT_SHREDDED",
            Error::EventsPruned { .. } => "EVENTS_PRUNED",
            Error::AuditUnavailable => "AUDIT_UNAVAILABLE",
            Error::Audit(e) => e.reason(),
            Error::Backup(e) => e.reason(),
            Error::PrimaryKey { .. } => "KEY_IS_PRIMARY",
            Error::KeyNotFound => "KEY_NOT_FOUND",
            Error::JobNotFound => "JOB_NOT_FOUND",
            Error::SameRootKey => "SAME_ROOT_KEY",
            Error::RootKey(_) => "ROOT_KEY_UNAVAILABLE",
            Error::Contention => "CONTENTION",
            Error::Store(_) => "STORAGE",
            Error::Corrupt(_) => "CORRUPT",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A status carrying a `google.rpc.ErrorInfo` detail (domain `credvault`) with
/// the stable `reason`.
pub fn status_with_reason(
    code: tonic::Code,
    message: impl Into<String>,
    reason: &str,
) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    tonic::Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, "credvault", std::collections::HashMap::new()),
    )
}

/// The stable reason of a status (its `google.rpc.ErrorInfo`), if it has one.
pub fn reason_of(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|info| info.reason)
}

/// The one mapping from library errors to gRPC statuses. Messages never carry
/// secrets; internal details are logged, not returned.
impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        use tonic::Code;
        let code = match &error {
            Error::Invalid(_) => Code::InvalidArgument,
            Error::NotFound | Error::KeyNotFound | Error::JobNotFound => Code::NotFound,
            Error::KeyInUse { .. }
            | Error::PrimaryKey { .. }
            | Error::SameRootKey
            | Error::TenantNotDeleted
            | Error::TenantShredded => Code::FailedPrecondition,
            Error::EventsPruned { .. } => Code::OutOfRange,
            Error::AuditUnavailable => Code::Unavailable,
            Error::Audit(crate::audit::AuditError::InvalidPageToken) => Code::InvalidArgument,
            Error::Audit(crate::audit::AuditError::Store(_)) => Code::Unavailable,
            Error::Audit(_) => Code::DataLoss,
            Error::Revoked
            | Error::Expired
            | Error::TenantDeleted
            | Error::VersionMismatch { .. } => Code::FailedPrecondition,
            Error::DecryptionFailed => Code::DataLoss,
            Error::Contention => Code::Aborted,
            Error::Backup(e) => {
                use crate::vault::backup::BackupError as B;
                match e {
                    B::RelativeDirectory => Code::InvalidArgument,
                    B::DirectoryNotEmpty(_)
                    | B::TargetNotEmpty(_)
                    | B::Damaged { .. }
                    | B::WrongRootKey { .. } => Code::FailedPrecondition,
                    B::Busy | B::RootRotated => Code::Aborted,
                    B::Write { .. } | B::Read { .. } => Code::Internal,
                    B::Store(_) => Code::Unavailable,
                }
            }
            Error::Store(_) => Code::Unavailable,
            Error::WrongRootKey
            | Error::RetiredRootKey { .. }
            | Error::RootKey(_)
            | Error::Corrupt(_) => Code::Internal,
        };
        let message = match &error {
            Error::Store(_)
            | Error::Backup(crate::vault::backup::BackupError::Store(_))
            | Error::WrongRootKey
            | Error::RetiredRootKey { .. }
            | Error::RootKey(_)
            | Error::Audit(
                crate::audit::AuditError::Corrupt { .. }
                | crate::audit::AuditError::ChainBroken { .. }
                | crate::audit::AuditError::Store(_),
            )
            | Error::Corrupt(_) => {
                tracing::error!(%error, "internal error");
                "internal error; see the server log".to_string()
            }
            Error::DecryptionFailed => "the stored credential could not be decrypted".to_string(),
            _ => error.to_string(),
        };
        status_with_reason(code, message, error.reason())
    }
}
