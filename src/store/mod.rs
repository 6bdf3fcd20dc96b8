//! Storage: a narrow key-value trait and its sled backend.
//!
//! The vault sees only [`Store`]: point reads, ordered prefix scans, and atomic
//! batches with preconditions and counters (add and saturating subtract). [`Store::commit`] resolves only
//! once the batch is on disk (fsync'd); that is the moment a write may be
//! acknowledged. Only `store::sled` imports sled; another backend (a
//! replicated SQL database) implements the same trait.
//!
//! What the keys and values mean lives in [`layout`] and [`records`], which are
//! backend-neutral.

pub mod layout;
mod pages;
pub mod records;
mod sled;
mod wal;

use std::future::Future;
use std::pin::Pin;

pub use self::sled::{CopyError, Durability, ImportError, SledStore, StoreOptions, dir_bytes};

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A precondition of the batch did not hold; nothing was written.
    #[error("a concurrent change conflicted with this write; nothing was written")]
    Conflict,
    /// The backend failed; what was written may not be durable.
    #[error("storage failure: {0}")]
    Backend(String),
    /// An earlier flush failed, so the store refuses further writes.
    #[error("the store could not make writes durable and refuses further writes: {0}")]
    Poisoned(String),
}

/// One change inside a [`Batch`].
#[derive(Debug, Clone)]
pub enum Op {
    /// Set `key` to `value`.
    Put(Vec<u8>, Vec<u8>),
    /// Remove `key` (no error if absent).
    Delete(Vec<u8>),
    /// Add to the big-endian u64 counter at `key` (absent = 0), saturating at `u64::MAX`.
    Add(Vec<u8>, u64),
    /// Subtract from the big-endian u64 counter at `key` (absent = 0), saturating
    /// at 0. Reference counts go down with it; a saturation means they had
    /// drifted, and the backend logs it.
    Sub(Vec<u8>, u64),
    /// Append to the log under the prefix: the entry goes at `prefix ‖ seq`
    /// (u64, big-endian), `seq` one more than the last entry's (1 for the
    /// first), its value built from `seq` and the previous entry's value.
    /// Entries are numbered in commit order, without gaps. A log must always
    /// keep its newest entry (pruning stops short of it), or a restart would
    /// number from 1 again.
    Append(Vec<u8>, Entry),
}

/// Builds a log entry's value from its sequence number and the previous
/// entry's value (`None` for the first): an event, or an audit record chained
/// to the one before it.
#[derive(Clone)]
pub struct Entry(pub std::sync::Arc<EntryFn>);

/// See [`Entry`].
pub type EntryFn = dyn Fn(u64, Option<&[u8]>) -> Vec<u8> + Send + Sync;

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Entry(..)")
    }
}

/// The key of entry `seq` of the log under `prefix`.
pub fn log_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 8);
    key.extend_from_slice(prefix);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// An atomic, conditional set of changes: either every op applies, or none.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Each `(key, expected)` must hold when the batch applies (`None` = absent).
    pub checks: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The changes, applied in order.
    pub ops: Vec<Op>,
}

impl Batch {
    /// Requires `key` to hold exactly `expected` (`None`: to be absent).
    pub fn check(&mut self, key: Vec<u8>, expected: Option<Vec<u8>>) -> &mut Self {
        self.checks.push((key, expected));
        self
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> &mut Self {
        self.ops.push(Op::Put(key, value));
        self
    }

    pub fn delete(&mut self, key: Vec<u8>) -> &mut Self {
        self.ops.push(Op::Delete(key));
        self
    }

    pub fn add(&mut self, key: Vec<u8>, delta: u64) -> &mut Self {
        self.ops.push(Op::Add(key, delta));
        self
    }

    pub fn sub(&mut self, key: Vec<u8>, delta: u64) -> &mut Self {
        self.ops.push(Op::Sub(key, delta));
        self
    }

    /// Appends to the log under `prefix` (see [`Op::Append`]).
    pub fn append(
        &mut self,
        prefix: Vec<u8>,
        entry: impl Fn(u64, Option<&[u8]>) -> Vec<u8> + Send + Sync + 'static,
    ) -> &mut Self {
        self.ops
            .push(Op::Append(prefix, Entry(std::sync::Arc::new(entry))));
        self
    }
}

/// One item of an export ([`Store::export`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exported<'a> {
    /// A record as the store held it at some moment while the export ran.
    Row(&'a [u8], &'a [u8]),
    /// The value (`None`: deleted) of a record written while the export ran,
    /// as it stood when the export ended. Applied over the rows, the changes
    /// give the store exactly as it stood at that moment.
    Change(&'a [u8], Option<&'a [u8]>),
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportCounts {
    pub rows: u64,
    pub changes: u64,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Another export of this store is running.
    #[error("another backup of this store is running")]
    Busy,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sink refused an item (its file could not be written).
    #[error("writing the backup: {0}")]
    Sink(#[from] std::io::Error),
}

/// Where an export goes, item by item.
pub type ExportSink<'a> = dyn FnMut(Exported<'_>) -> std::io::Result<()> + 'a;

/// How the store is doing, for `credvault status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreHealth {
    /// False once a write, sync or checkpoint failed: every later write is
    /// refused (the server log says why).
    pub writable: bool,
    /// Bytes the backend's files use, if it can tell.
    pub bytes_on_disk: Option<u64>,
}

/// A key and its value.
pub type Row = (Vec<u8>, Vec<u8>);
/// Key-value pairs, in key order.
pub type Rows = Vec<Row>;

/// Resolves to the new values of the batch's counters ([`Op::Add`] and
/// [`Op::Sub`]) and the sequence numbers of its appends ([`Op::Append`]), in
/// batch order, once the batch is applied and durable.
pub type CommitFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<u64>, StoreError>> + Send + 'a>>;

/// The storage the vault needs, and nothing more.
pub trait Store: Send + Sync + 'static {
    /// The value at `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Up to `limit` entries whose key starts with `prefix`, in key order,
    /// strictly after `start_after` when given.
    fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Rows, StoreError>;

    /// The last entry (in key order) whose key starts with `prefix`.
    fn last(&self, prefix: &[u8]) -> Result<Option<Row>, StoreError>;

    /// Applies `batch` atomically if all its checks hold ([`StoreError::Conflict`]
    /// and nothing written otherwise), and resolves once it is durable.
    /// Concurrent commits share one flush (group commit).
    fn commit(&self, batch: Batch) -> CommitFuture<'_>;

    /// Copies every record, as the backend stores it, to `sink` while writes
    /// go on (blocking; run it off the async workers): first every row, each
    /// as it stood at some moment of the export, then the final value of
    /// every record written meanwhile ([`Exported`]). One export at a time.
    fn export(&self, sink: &mut ExportSink<'_>) -> Result<ExportCounts, ExportError>;

    /// Whether writes are still taken, and the size on disk.
    fn health(&self) -> StoreHealth;

    /// Whether writes are still taken ([`StoreHealth::writable`]), without
    /// measuring the size on disk: the server's health asks every second.
    fn writable(&self) -> bool {
        self.health().writable
    }

    /// A directory on local disk that this process holds exclusively for as
    /// long as the store is open, for files that live and die with the store
    /// (the audit journal). `None` for a backend without one (say, a
    /// replicated database): such side files would be durable on one host only.
    fn local_dir(&self) -> Option<&std::path::Path> {
        None
    }
}
