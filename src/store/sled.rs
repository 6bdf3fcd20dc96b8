//! The sled 0.34.7 backend: one tree, atomic conditional batches, and group
//! commit with real durability.
//!
//! sled's `flush` writes its log with `sync_file_range`, which neither flushes
//! the drive's write cache nor file metadata, and it writes values too large
//! for its log segments to separate blob files without syncing them. So after
//! each flush the flusher thread also `fdatasync`s the log file through a
//! second handle, and syncs new blob files and the blob directory. One flush
//! covers every write applied before it started: concurrent writers share it.
//! See `docs/decisions/0001-sled-durability-and-group-commit.md`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::watch;

use super::layout::{decode_counter, encode_counter};
use super::{Applied, Batch, DurableFuture, Op, Rows, Store, StoreError};

/// How writes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Concurrent writers share one flush + fdatasync (the default).
    #[default]
    GroupCommit,
    /// Every write does its own flush + fdatasync (for comparison in benchmarks).
    PerWrite,
}

/// How to open a [`SledStore`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The data directory; created if missing.
    pub path: PathBuf,
    /// sled's page cache, in bytes. sled's 1 GiB default drives resident memory
    /// far past what a vault of this size needs.
    pub cache_capacity: u64,
    pub durability: Durability,
}

impl StoreOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            cache_capacity: 128 << 20,
            durability: Durability::GroupCommit,
        }
    }
}

/// What the flusher has made durable, published to waiting writers.
#[derive(Debug, Clone, Default)]
struct Flushed {
    /// Every ticket ≤ this is durable.
    upto: u64,
    /// Set when a flush failed; the store then refuses writes.
    failure: Option<String>,
}

#[derive(Default)]
struct Pending {
    /// The last ticket handed out.
    applied: u64,
    shutdown: bool,
}

struct Shared {
    db: sled::Db,
    files: SyncFiles,
    pending: Mutex<Pending>,
    wake: Condvar,
    flushed: watch::Sender<Flushed>,
}

/// A sled store. Opened by one process at a time (sled takes a file lock).
pub struct SledStore {
    shared: Arc<Shared>,
    durability: Durability,
    flusher: Option<JoinHandle<()>>,
}

impl SledStore {
    /// Opens (or creates) the store. Recovery after a crash happens here.
    pub fn open(options: &StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&options.path).map_err(backend)?;
        let db = sled::Config::new()
            .path(&options.path)
            .cache_capacity(options.cache_capacity)
            .flush_every_ms(None)
            .open()
            .map_err(backend)?;
        let files = SyncFiles::open(&options.path)?;
        let (flushed, _) = watch::channel(Flushed::default());
        let shared = Arc::new(Shared {
            db,
            files,
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            flushed,
        });
        let flusher = match options.durability {
            Durability::GroupCommit => {
                let shared = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("credvault-flusher".into())
                        .spawn(move || shared.run_flusher())
                        .map_err(backend)?,
                )
            }
            Durability::PerWrite => None,
        };
        Ok(Self {
            shared,
            durability: options.durability,
            flusher,
        })
    }

    /// Bytes sled reports on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.shared.db.size_on_disk().map_err(backend)
    }
}

impl Shared {
    /// Flushes sled, then makes its files durable. Returns the error text on failure.
    fn flush_and_sync(&self) -> Result<(), String> {
        self.db.flush().map_err(|e| e.to_string())?;
        self.files.sync().map_err(|e| e.to_string())
    }

    fn run_flusher(&self) {
        loop {
            let target = {
                let mut pending = self.pending.lock().expect("flusher lock");
                while pending.applied == self.flushed.borrow().upto && !pending.shutdown {
                    pending = self.wake.wait(pending).expect("flusher lock");
                }
                if pending.applied == self.flushed.borrow().upto {
                    return; // shut down with nothing left to flush
                }
                pending.applied
            };
            let result = self.flush_and_sync();
            self.flushed.send_modify(|flushed| match result {
                Ok(()) => flushed.upto = target,
                Err(error) => {
                    tracing::error!(%error, "store flush failed; refusing further writes");
                    flushed.failure.get_or_insert(error);
                    flushed.upto = target; // wake the waiters: they see the failure
                }
            });
            if self.flushed.borrow().failure.is_some() {
                return;
            }
        }
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        if let Some(flusher) = self.flusher.take() {
            self.shared.pending.lock().expect("flusher lock").shutdown = true;
            self.shared.wake.notify_all();
            let _ = flusher.join();
        }
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .shared
            .db
            .get(key)
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Rows, StoreError> {
        let db = &self.shared.db;
        let iter = match start_after {
            Some(after) if after >= prefix => {
                db.range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            }
            _ => db.range::<&[u8], _>(prefix..),
        };
        iter.take_while(|item| item.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
            .take(limit)
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(backend))
            .collect()
    }

    fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        if let Some(failure) = &self.shared.flushed.borrow().failure {
            return Err(StoreError::Poisoned(failure.clone()));
        }
        let counters = self
            .shared
            .db
            .transaction(|tx| {
                for (key, expected) in &batch.checks {
                    let actual = tx.get(key)?;
                    if actual.as_deref() != expected.as_deref() {
                        return Err(ConflictableTransactionError::Abort(()));
                    }
                }
                let mut counters = Vec::new();
                for op in &batch.ops {
                    match op {
                        Op::Put(key, value) => {
                            tx.insert(key.as_slice(), value.as_slice())?;
                        }
                        Op::Delete(key) => {
                            tx.remove(key.as_slice())?;
                        }
                        Op::Add(key, delta) => {
                            let old = tx.get(key)?.and_then(|v| decode_counter(&v)).unwrap_or(0);
                            let new = old.saturating_add(*delta);
                            tx.insert(key.as_slice(), encode_counter(new))?;
                            counters.push(new);
                        }
                    }
                }
                Ok(counters)
            })
            .map_err(|e| match e {
                TransactionError::Abort(()) => StoreError::Conflict,
                TransactionError::Storage(e) => backend(e),
            })?;
        let ticket = {
            let mut pending = self.shared.pending.lock().expect("flusher lock");
            pending.applied += 1;
            pending.applied
        };
        if self.durability == Durability::GroupCommit {
            self.shared.wake.notify_one();
        }
        Ok(Applied { ticket, counters })
    }

    fn durable(&self, ticket: u64) -> DurableFuture<'_> {
        Box::pin(async move {
            match self.durability {
                Durability::GroupCommit => {
                    let mut rx = self.shared.flushed.subscribe();
                    let flushed = rx
                        .wait_for(|f| f.upto >= ticket)
                        .await
                        .map_err(|_| StoreError::Backend("store closed".into()))?;
                    match &flushed.failure {
                        Some(failure) => Err(StoreError::Poisoned(failure.clone())),
                        None => Ok(()),
                    }
                }
                Durability::PerWrite => {
                    let shared = self.shared.clone();
                    tokio::task::spawn_blocking(move || shared.flush_and_sync())
                        .await
                        .map_err(backend)?
                        .map_err(StoreError::Backend)
                }
            }
        })
    }
}

/// Second handles on sled's files, to fdatasync what `sync_file_range` leaves.
struct SyncFiles {
    log: File,
    dir: PathBuf,
    /// Blob files already synced (sled never rewrites a blob file in place).
    synced_blobs: Mutex<HashSet<OsString>>,
}

impl SyncFiles {
    fn open(dir: &Path) -> Result<Self, StoreError> {
        let log = File::open(dir.join("db")).map_err(backend)?;
        let files = Self {
            log,
            dir: dir.to_owned(),
            synced_blobs: Mutex::default(),
        };
        // The directory entries of a freshly created store must survive a crash too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(backend)?;
        Ok(files)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.log.sync_data()?;
        let blob_dir = self.dir.join("blobs");
        let Ok(entries) = std::fs::read_dir(&blob_dir) else {
            return Ok(()); // no blobs yet
        };
        let mut synced = self.synced_blobs.lock().expect("blob set lock");
        let mut present = HashSet::new();
        let mut new_files = false;
        for entry in entries {
            let name = entry?.file_name();
            if !synced.contains(&name) {
                File::open(blob_dir.join(&name))?.sync_data()?;
                new_files = true;
            }
            present.insert(name);
        }
        if new_files {
            File::open(&blob_dir)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, durability: Durability) -> SledStore {
        SledStore::open(&StoreOptions {
            durability,
            ..StoreOptions::new(dir)
        })
        .unwrap()
    }

    #[tokio::test]
    async fn batch_is_atomic_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::GroupCommit);
        let mut batch = Batch::default();
        batch
            .check(b"a".to_vec(), None)
            .put(b"a".to_vec(), b"1".to_vec())
            .add(b"n".to_vec(), 5);
        assert_eq!(super::super::commit(&store, &batch).await.unwrap(), vec![5]);
        // Same batch again: the check fails, so the counter must not move.
        assert!(matches!(store.apply(&batch), Err(StoreError::Conflict)));
        assert_eq!(store.get(b"n").unwrap(), Some(encode_counter(5)));
        let mut batch = Batch::default();
        batch
            .check(b"a".to_vec(), Some(b"1".to_vec()))
            .delete(b"a".to_vec())
            .add(b"n".to_vec(), 2);
        assert_eq!(super::super::commit(&store, &batch).await.unwrap(), vec![7]);
        assert_eq!(store.get(b"a").unwrap(), None);
    }

    #[tokio::test]
    async fn scan_respects_prefix_cursor_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::PerWrite);
        let mut batch = Batch::default();
        for key in ["p\0a", "p\0b", "p\0c", "q\0a", "p"] {
            batch.put(key.as_bytes().to_vec(), b"v".to_vec());
        }
        super::super::commit(&store, &batch).await.unwrap();
        let keys = |rows: Vec<(Vec<u8>, Vec<u8>)>| {
            rows.into_iter()
                .map(|(k, _)| String::from_utf8(k).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(store.scan(b"p\0", None, 10).unwrap()),
            ["p\0a", "p\0b", "p\0c"]
        );
        assert_eq!(
            keys(store.scan(b"p\0", Some(b"p\0a"), 1).unwrap()),
            ["p\0b"]
        );
        assert!(store.scan(b"p\0", Some(b"p\0c"), 10).unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_flushes_and_counters_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path(), Durability::GroupCommit));
        let tasks: Vec<_> = (0..32u32)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    for j in 0..20u32 {
                        let mut batch = Batch::default();
                        batch
                            .put(format!("k{i}-{j}").into_bytes(), vec![1])
                            .add(b"n".to_vec(), 1);
                        super::super::commit(&*store, &batch).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(store.get(b"n").unwrap(), Some(encode_counter(640)));
        drop(store);
        let store = open(dir.path(), Durability::GroupCommit);
        assert_eq!(store.get(b"n").unwrap(), Some(encode_counter(640)));
        assert_eq!(store.scan(b"k", None, 1000).unwrap().len(), 640);
    }
}
