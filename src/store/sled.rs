//! The sled 0.34.7 backend: one tree, one committer thread, group commit with
//! real durability.
//!
//! Every write goes through the committer thread: it takes all batches waiting
//! in its queue, checks each batch's preconditions against the tree as the
//! earlier batches of the group leave it (no other thread writes, so a check
//! cannot race), applies every passing batch of the group as one atomic sled
//! `apply_batch`, and flushes it. A second thread, the syncer, then makes the
//! flushed groups durable (below) and replies to every writer; while it waits
//! on the disk, the committer already applies and flushes the next group. sled transactions are not used: under
//! concurrent writers they serialise on a global lock and ran at a fraction of
//! this design's rate (see `docs/decisions/0001-storage-durability.md`).
//!
//! sled's `flush` writes its log with `sync_file_range`, which neither flushes
//! the drive's write cache nor file metadata, and it writes values too large
//! for a log segment to separate blob files without syncing them. So after each
//! flush the committer also `fdatasync`s the log file through a second handle
//! and syncs new blob files and the blob directory.

use std::borrow::Cow;
use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::layout::{decode_counter, encode_counter};
use super::{Batch, CommitFuture, Op, Row, Rows, Store, StoreError};

/// How writes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// All writes waiting when a flush starts share it (the default).
    #[default]
    GroupCommit,
    /// Every write gets its own flush + fdatasync (for comparison in benchmarks).
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
            cache_capacity: 256 << 20,
            durability: Durability::GroupCommit,
        }
    }
}

/// Most batches one flush covers; bounds the latency of the first in a group.
const MAX_GROUP: usize = 512;
/// A group stops taking batches past this many bytes of keys and values.
const MAX_GROUP_BYTES: usize = 16 << 20;

/// The batches of one group as staged so far: one sled batch for all of them,
/// and what each key will hold, for the checks and counters of later batches.
#[derive(Default)]
struct Group {
    writes: sled::Batch,
    overlay: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
}

/// Roughly the bytes a batch writes.
fn batch_bytes(batch: &Batch) -> usize {
    batch
        .ops
        .iter()
        .map(|op| match op {
            Op::Put(k, v) => k.len() + v.len(),
            Op::Delete(k) | Op::Add(k, _) | Op::Sub(k, _) | Op::Append(k, _) => k.len() + 8,
        })
        .sum()
}

type Outcome = Result<Vec<u64>, StoreError>;
type Reply = oneshot::Sender<Outcome>;
/// A key's value as staged (`None`: deleted).
type Value = Option<Vec<u8>>;
/// The last entry of a log: its sequence number (0: none) and value.
type LogEnd = (u64, Option<Vec<u8>>);
/// A flushed group on its way to the syncer: each writer's reply and outcome.
type Flushed = Vec<(Reply, Outcome)>;

/// A sled store. Opened by one process at a time (sled takes a file lock).
pub struct SledStore {
    db: sled::Db,
    queue: Option<mpsc::Sender<(Batch, Reply)>>,
    committer: Option<JoinHandle<()>>,
}

impl SledStore {
    /// Opens (or creates) the store. Recovery after a crash happens here.
    pub fn open(options: &StoreOptions) -> Result<Self, StoreError> {
        create_private_dir(&options.path)?;
        let db = sled::Config::new()
            .path(&options.path)
            .cache_capacity(options.cache_capacity)
            .flush_every_ms(None)
            .open()
            .map_err(backend)?;
        let failure = Arc::new(Mutex::new(None));
        let (synced, to_sync) = mpsc::channel();
        let mut syncer = Syncer {
            files: SyncFiles::open(&options.path)?,
            failure: failure.clone(),
        };
        let sync_thread = std::thread::Builder::new()
            .name("credvault-sync".into())
            .spawn(move || syncer.run(to_sync))
            .map_err(backend)?;
        let mut committer = Committer {
            db: db.clone(),
            group: match options.durability {
                Durability::GroupCommit => MAX_GROUP,
                Durability::PerWrite => 1,
            },
            failure,
            logs: Default::default(),
            syncer: Some((synced, sync_thread)),
        };
        let (queue, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("credvault-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(backend)?;
        Ok(Self {
            db,
            queue: Some(queue),
            committer: Some(handle),
        })
    }

    /// Bytes sled reports on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(backend)
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        drop(self.queue.take()); // the committer drains the queue, then exits
        if let Some(handle) = self.committer.take() {
            let _ = handle.join();
        }
    }
}

/// Creates the data directory readable by its owner only (sled creates its files
/// with the process umask); warns if an existing one is open to others.
fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(backend)?;
    let mode = std::fs::metadata(path)
        .map_err(backend)?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "data directory is accessible to group or others");
    }
    Ok(())
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The thread that owns every write: it applies each waiting batch, then makes
/// the whole group durable with one flush and replies.
struct Committer {
    db: sled::Db,
    /// Most batches per flush (1 = a flush per write).
    group: usize,
    /// Set when a flush or sync failed: durability is then unknown, so every
    /// later write is refused rather than acknowledged.
    failure: Arc<Mutex<Option<String>>>,
    /// The last entry of each log appended to so far: its sequence number
    /// and value (read from the tree on first use; cleared if a group fails
    /// to apply).
    logs: std::collections::HashMap<Vec<u8>, LogEnd>,
    /// Where flushed groups go to be synced and answered, and its thread.
    syncer: Option<(mpsc::Sender<Flushed>, JoinHandle<()>)>,
}

/// The second stage: `fdatasync`s what the committer flushed, then replies.
/// While it waits on the disk, the committer applies and flushes the next
/// group; groups that queue up meanwhile share one sync.
struct Syncer {
    files: SyncFiles,
    failure: Arc<Mutex<Option<String>>>,
}

impl Syncer {
    fn run(&mut self, rx: mpsc::Receiver<Flushed>) {
        while let Ok(first) = rx.recv() {
            let mut outcomes = first;
            while let Ok(more) = rx.try_recv() {
                outcomes.extend(more);
            }
            let mut failure = self.failure.lock().expect("failure lock").clone();
            if failure.is_none()
                && outcomes.iter().any(|(_, outcome)| outcome.is_ok())
                && let Err(error) = self.files.sync()
            {
                tracing::error!(%error, "store sync failed; refusing further writes");
                *self.failure.lock().expect("failure lock") = Some(error.clone());
                failure = Some(error);
            }
            if let Some(failure) = failure {
                for (_, outcome) in outcomes.iter_mut().filter(|(_, o)| o.is_ok()) {
                    *outcome = Err(StoreError::Poisoned(failure.clone()));
                }
            }
            for (reply, outcome) in outcomes {
                let _ = reply.send(outcome); // the writer may have gone away
            }
        }
    }
}

impl Committer {
    fn run(&mut self, rx: mpsc::Receiver<(Batch, Reply)>) {
        while let Ok(first) = rx.recv() {
            let mut bytes = batch_bytes(&first.0);
            let mut group = vec![first];
            while group.len() < self.group && bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(next) => {
                        bytes += batch_bytes(&next.0);
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            let mut staged = Group::default();
            let mut outcomes: Vec<_> = group
                .into_iter()
                .map(|(batch, reply)| (reply, self.stage(&batch, &mut staged)))
                .collect();
            // The whole group is one atomic sled batch: one log write, and a
            // flush that costs about the same for 1 batch or 500 (issue 2's
            // measurements: 64 batches applied one by one flush in ~5 ms, as
            // one sled batch in ~0.5 ms).
            if !staged.overlay.is_empty()
                && let Err(error) = self.db.apply_batch(staged.writes)
            {
                let error = error.to_string();
                for (_, outcome) in outcomes.iter_mut().filter(|(_, o)| o.is_ok()) {
                    *outcome = Err(StoreError::Backend(error.clone()));
                }
                self.logs.clear(); // what was staged is not in the tree
            }
            self.finish(outcomes);
        }
        // Queue closed: let the syncer answer what it holds, then stop.
        if let Some((queue, thread)) = self.syncer.take() {
            drop(queue);
            let _ = thread.join();
        }
    }

    /// The value of `key` as the group has staged it so far, else as stored.
    fn current(&self, group: &Group, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match group.overlay.get(key) {
            Some(value) => Ok(value.clone()),
            None => Ok(self.db.get(key).map_err(backend)?.map(|v| v.to_vec())),
        }
    }

    /// Checks one batch against the store as the group has staged it so far
    /// (no other thread writes, so a check cannot race), and stages its ops.
    /// A batch is staged entirely or not at all.
    fn stage(&mut self, batch: &Batch, group: &mut Group) -> Outcome {
        if let Some(failure) = &*self.failure.lock().expect("failure lock") {
            return Err(StoreError::Poisoned(failure.clone()));
        }
        for (key, expected) in &batch.checks {
            if self.current(group, key)?.as_deref() != expected.as_deref() {
                return Err(StoreError::Conflict);
            }
        }
        let mut counters = Vec::new();
        // Within one batch a later op sees an earlier one's value.
        let mut changes: Vec<(Cow<'_, [u8]>, Value)> = Vec::new();
        let mut appended: Vec<(&[u8], LogEnd)> = Vec::new();
        for op in &batch.ops {
            match op {
                Op::Put(key, value) => changes.push((key.into(), Some(value.clone()))),
                Op::Delete(key) => changes.push((key.into(), None)),
                Op::Append(prefix, entry) => {
                    let (last, previous) = match appended.iter().rev().find(|(p, _)| p == prefix) {
                        Some((_, last)) => last.clone(),
                        None => self.last_entry(prefix)?,
                    };
                    let seq = last + 1;
                    let value = (entry.0)(seq, previous.as_deref());
                    changes.push((super::log_key(prefix, seq).into(), Some(value.clone())));
                    appended.push((prefix, (seq, Some(value))));
                    counters.push(seq);
                }
                Op::Add(key, delta) | Op::Sub(key, delta) => {
                    let current = match changes
                        .iter()
                        .rev()
                        .find(|(k, _)| k.as_ref() == key.as_slice())
                    {
                        Some((_, value)) => value.clone(),
                        None => self.current(group, key)?,
                    };
                    let current = current.as_deref().and_then(decode_counter).unwrap_or(0);
                    let new = match op {
                        Op::Add(..) => current.saturating_add(*delta),
                        _ => {
                            if current < *delta {
                                tracing::warn!(key = %key.escape_ascii(), current, delta, "counter would go below zero; kept at 0");
                            }
                            current.saturating_sub(*delta)
                        }
                    };
                    changes.push((key.into(), Some(encode_counter(new))));
                    counters.push(new);
                }
            }
        }
        for (key, value) in changes {
            match &value {
                Some(value) => group.writes.insert(key.as_ref(), value.as_slice()),
                None => group.writes.remove(key.as_ref()),
            }
            group.overlay.insert(key.into_owned(), value);
        }
        for (prefix, last) in appended {
            self.logs.insert(prefix.to_vec(), last);
        }
        Ok(counters)
    }

    /// The last entry of the log under `prefix`: (0, None) when it is empty.
    fn last_entry(&mut self, prefix: &[u8]) -> Result<LogEnd, StoreError> {
        if let Some(last) = self.logs.get(prefix) {
            return Ok(last.clone());
        }
        let last = match prefix_successor(prefix) {
            Some(bound) => self.db.get_lt(bound).map_err(backend)?,
            None => self.db.last().map_err(backend)?,
        };
        let last = match last {
            Some((key, value)) if key.starts_with(prefix) => {
                let seq = key[prefix.len()..]
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Backend("malformed log key".into()))?;
                (seq, Some(value.to_vec()))
            }
            _ => (0, None),
        };
        self.logs.insert(prefix.to_vec(), last.clone());
        Ok(last)
    }

    /// One flush for every applied batch in `outcomes`, then on to the syncer,
    /// which makes it durable and replies.
    fn finish(&mut self, outcomes: Vec<(Reply, Outcome)>) {
        let failed = self.failure.lock().expect("failure lock").is_some();
        if !failed
            && outcomes.iter().any(|(_, outcome)| outcome.is_ok())
            && let Err(error) = self.db.flush()
        {
            let error = error.to_string();
            tracing::error!(%error, "store flush failed; refusing further writes");
            *self.failure.lock().expect("failure lock") = Some(error);
        }
        if let Some((queue, _)) = &self.syncer {
            // The syncer lives as long as the committer; if it died, the
            // replies are dropped and the writers see the store as closed.
            let _ = queue.send(outcomes);
        }
    }
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(backend)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Rows, StoreError> {
        let iter = match start_after {
            Some(after) if after >= prefix => self
                .db
                .range::<&[u8], _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            _ => self.db.range::<&[u8], _>(prefix..),
        };
        iter.take_while(|item| item.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
            .take(limit)
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(backend))
            .collect()
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Row>, StoreError> {
        // One descent to the greatest key below the prefix's successor, rather
        // than a reverse iterator (which costs a second descent and more).
        let last = match prefix_successor(prefix) {
            Some(bound) => self.db.get_lt(bound).map_err(backend)?,
            None => self.db.last().map_err(backend)?,
        };
        Ok(last
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn commit(&self, batch: Batch) -> CommitFuture<'_> {
        let (reply, done) = oneshot::channel();
        let sent = self.queue.as_ref().map(|queue| queue.send((batch, reply)));
        Box::pin(async move {
            match sent {
                Some(Ok(())) => done
                    .await
                    .map_err(|_| StoreError::Backend("store closed".into()))?,
                _ => Err(StoreError::Backend("store closed".into())),
            }
        })
    }
}

/// The smallest key greater than every key that starts with `prefix` (`None`
/// when there is none: the prefix is all 0xff).
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut bound = prefix.to_vec();
    while let Some(last) = bound.pop() {
        if last < u8::MAX {
            bound.push(last + 1);
            return Some(bound);
        }
    }
    None
}

/// Second handles on sled's files, to fdatasync what `sync_file_range` leaves.
struct SyncFiles {
    log: File,
    dir: PathBuf,
    /// Blob files already synced (sled never rewrites a blob file in place).
    synced_blobs: HashSet<OsString>,
}

impl SyncFiles {
    fn open(dir: &Path) -> Result<Self, StoreError> {
        let log = File::open(dir.join("db")).map_err(backend)?;
        // The directory entries of a freshly created store must survive a crash too.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(backend)?;
        Ok(Self {
            log,
            dir: dir.to_owned(),
            synced_blobs: HashSet::new(),
        })
    }

    fn sync(&mut self) -> Result<(), String> {
        self.sync_io().map_err(|e| e.to_string())
    }

    fn sync_io(&mut self) -> std::io::Result<()> {
        self.log.sync_data()?;
        let blob_dir = self.dir.join("blobs");
        let Ok(entries) = std::fs::read_dir(&blob_dir) else {
            return Ok(()); // no blobs yet
        };
        let mut present = HashSet::new();
        let mut new_files = false;
        for entry in entries {
            let name = entry?.file_name();
            if !self.synced_blobs.contains(&name) {
                File::open(blob_dir.join(&name))?.sync_data()?;
                new_files = true;
            }
            present.insert(name);
        }
        if new_files {
            File::open(&blob_dir)?.sync_all()?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
        assert_eq!(store.commit(batch.clone()).await.unwrap(), vec![5]);
        // Same batch again: the check fails, so the counter must not move.
        assert!(matches!(
            store.commit(batch.clone()).await,
            Err(StoreError::Conflict)
        ));
        assert_eq!(store.get(b"n").unwrap(), Some(encode_counter(5)));
        let mut batch = Batch::default();
        batch
            .check(b"a".to_vec(), Some(b"1".to_vec()))
            .delete(b"a".to_vec())
            .add(b"n".to_vec(), 2);
        assert_eq!(store.commit(batch.clone()).await.unwrap(), vec![7]);
        assert_eq!(store.get(b"a").unwrap(), None);
    }

    #[tokio::test]
    async fn sub_sees_earlier_ops_and_saturates_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::GroupCommit);
        let mut batch = Batch::default();
        batch
            .add(b"n".to_vec(), 5)
            .sub(b"n".to_vec(), 2)
            .sub(b"m".to_vec(), 1)
            .add(b"m".to_vec(), 4);
        assert_eq!(store.commit(batch).await.unwrap(), vec![5, 3, 0, 4]);
        let mut batch = Batch::default();
        batch.sub(b"n".to_vec(), 10).put(b"x".to_vec(), vec![1]);
        assert_eq!(store.commit(batch).await.unwrap(), vec![0]);
        assert_eq!(store.get(b"n").unwrap(), Some(encode_counter(0)));
        assert_eq!(store.get(b"m").unwrap(), Some(encode_counter(4)));
        // A failed check moves no counter.
        let mut batch = Batch::default();
        batch.check(b"x".to_vec(), None).sub(b"m".to_vec(), 1);
        assert!(matches!(
            store.commit(batch).await,
            Err(StoreError::Conflict)
        ));
        assert_eq!(store.get(b"m").unwrap(), Some(encode_counter(4)));
    }

    #[tokio::test]
    async fn scan_respects_prefix_cursor_and_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::PerWrite);
        let mut batch = Batch::default();
        for key in ["p\0a", "p\0b", "p\0c", "q\0a", "p"] {
            batch.put(key.as_bytes().to_vec(), b"v".to_vec());
        }
        store.commit(batch.clone()).await.unwrap();
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
                        store.commit(batch).await.unwrap();
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_batch_sees_the_batches_staged_before_it_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path(), Durability::GroupCommit));
        // Queued together, so most land in one group: each claims the same
        // key (must be absent) and bumps a counter. Exactly one may win, and
        // the losers' counter bumps must not be applied.
        let tasks: Vec<_> = (0..64u32)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut batch = Batch::default();
                    batch
                        .check(b"owner".to_vec(), None)
                        .put(b"owner".to_vec(), i.to_be_bytes().to_vec())
                        .add(b"claims".to_vec(), 1);
                    store.commit(batch).await
                })
            })
            .collect();
        let mut won = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(counters) => {
                    assert_eq!(counters, [1]);
                    won += 1;
                }
                Err(StoreError::Conflict) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(won, 1);
        assert_eq!(store.get(b"claims").unwrap(), Some(encode_counter(1)));
        // A later batch in a group sees an earlier one's delete and counter.
        let (a, b) = (store.clone(), store.clone());
        let first = async move {
            let mut batch = Batch::default();
            batch.delete(b"owner".to_vec()).add(b"claims".to_vec(), 5);
            a.commit(batch).await
        };
        let second = async move {
            let mut batch = Batch::default();
            batch
                .check(b"owner".to_vec(), None)
                .add(b"claims".to_vec(), 1);
            b.commit(batch).await
        };
        let (first, second) = tokio::join!(first, second);
        assert_eq!(first.unwrap(), [6]);
        match second {
            Ok(counters) => assert_eq!(counters, [7]),
            Err(e) => panic!("{e}"),
        }
        drop(store);
        let store = open(dir.path(), Durability::GroupCommit);
        assert_eq!(store.get(b"claims").unwrap(), Some(encode_counter(7)));
        assert_eq!(store.get(b"owner").unwrap(), None);
    }

    #[tokio::test]
    async fn last_is_the_greatest_key_under_the_prefix_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::GroupCommit);
        let mut batch = Batch::default();
        for key in [
            &b"v\0t\0a\0\x00\x00\x00\x01"[..],
            b"v\0t\0a\0\x00\x00\x01\x00",
            b"v\0t\0ab\0\x00\x00\x00\x09",
            b"v\0t\0b\0\x00\x00\x00\x01",
            b"\xff\xff",
        ] {
            batch.put(key.to_vec(), key.to_vec());
        }
        store.commit(batch).await.unwrap();
        let last = |prefix: &[u8]| store.last(prefix).unwrap().map(|(k, _)| k);
        assert_eq!(
            last(b"v\0t\0a\0"),
            Some(b"v\0t\0a\0\x00\x00\x01\x00".to_vec())
        );
        assert_eq!(
            last(b"v\0t\0ab\0"),
            Some(b"v\0t\0ab\0\x00\x00\x00\x09".to_vec())
        );
        assert_eq!(last(b"v\0t\0c\0"), None);
        assert_eq!(last(b"v\0t\0"), Some(b"v\0t\0b\0\x00\x00\x00\x01".to_vec()));
        assert_eq!(last(b"\xff"), Some(b"\xff\xff".to_vec()));
        assert_eq!(last(b"\xff\xff\xff"), None);
        assert_eq!(prefix_successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"\xff\xff"), None);
    }

    /// An entry whose value is its own sequence number followed by the
    /// previous entry's value's first 8 bytes (a miniature chain).
    fn chained(batch: &mut Batch) {
        batch.append(b"e\0".to_vec(), |seq, previous| {
            let mut value = seq.to_be_bytes().to_vec();
            value.extend_from_slice(previous.map_or(&[0u8; 8][..], |p| &p[..8]));
            value
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn appends_are_numbered_in_commit_order_without_gaps_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path(), Durability::GroupCommit));
        let tasks: Vec<_> = (0..32u32)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for j in 0..10u32 {
                        let mut batch = Batch::default();
                        if j == 3 {
                            // A failing batch appends nothing.
                            batch.check(b"never".to_vec(), Some(b"x".to_vec()));
                            chained(&mut batch);
                            assert!(matches!(
                                store.commit(batch).await,
                                Err(StoreError::Conflict)
                            ));
                            continue;
                        }
                        batch.put(format!("k{i}-{j}").into_bytes(), vec![1]);
                        chained(&mut batch);
                        chained(&mut batch);
                        let got = store.commit(batch).await.unwrap();
                        assert_eq!(got[1], got[0] + 1, "two appends in one batch are adjacent");
                        seqs.extend(got);
                    }
                    seqs
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (1..=32 * 9 * 2).collect::<Vec<u64>>());
        drop(store);
        // After a restart the numbering continues, and every entry names its predecessor.
        let store = open(dir.path(), Durability::GroupCommit);
        let mut batch = Batch::default();
        chained(&mut batch);
        assert_eq!(store.commit(batch).await.unwrap(), [32 * 9 * 2 + 1]);
        let rows = store.scan(b"e\0", None, usize::MAX).unwrap();
        assert_eq!(rows.len(), 32 * 9 * 2 + 1);
        for (n, (key, value)) in rows.iter().enumerate() {
            let seq = n as u64 + 1;
            assert_eq!(key, &crate::store::log_key(b"e\0", seq));
            assert_eq!(value[..8], seq.to_be_bytes());
            assert_eq!(value[8..], (seq - 1).to_be_bytes());
        }
    }
}
