//! credvault keeps tenants' web-session cookies and BYOK API keys sealed.
//!
//! A request flows: caller identity → policy → vault operation → store.
//! The vault seals every secret with envelope encryption:
//!
//! ```text
//! root key (operator-held) ─wraps→ KEK ring ─wraps→ tenant DEK ring ─seals→ credential payloads
//! ```
//!
//! all AES-256-GCM with random nonces and associated data that binds each
//! ciphertext to its tenant, credential, version, kind and key versions.
//!
//! Modules, in the order a request meets them:
//! - [`vault`]: the operations (seal, unseal, metadata, list, revoke) and key rings;
//! - [`crypto`]: key types, the root key source, the envelope format;
//! - [`store`]: the narrow storage trait and its durable sled backend;
//! - [`error`]: errors with stable reason codes; [`clock`]: injectable time.
#![forbid(unsafe_code)]

pub mod audit;
pub mod authn;
pub mod authz;
pub mod bench;
pub mod client;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod error;
pub mod hardening;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod vault;

pub use error::{Error, Result};
pub use vault::{Kind, Metadata, SealRequest, Secret, Unsealed, Vault, VaultOptions};
