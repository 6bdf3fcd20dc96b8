//! The audit journal: where a record that belongs to no change (an Unseal's, a
//! read's, a denial's) becomes durable before its call returns, without a trip
//! through the store's commit path.
//!
//! A record is framed, MAC'd and queued by the caller; one writer thread writes
//! every queued frame with one positioned `write` and one `fdatasync`, then
//! wakes their callers. When the previous group held more than one record the
//! writer takes the next no sooner than [`LINGER`] after it took that one, so
//! that groups grow under load (one sync for dozens of records, at most one
//! sync per linger) and a lone call is not delayed. The linger runs from the
//! last group's taking, not from this one's first record: the last sync, and
//! the wait for a first record, count towards it (since session 12; lingering
//! a full [`LINGER`] after the first record made a group's cycle about twice
//! as long, docs/performance.md). A feeder thread then
//! appends each durable group to the audit log in the store as one batch
//! (numbered and chained there, in commit order, like every other record) that
//! also records the newest journal id it holds (`m\0audit.journal`). On open,
//! frames with a higher id are appended before anything else: a record that
//! was acknowledged is in the log after `kill -9`.
//!
//! The file is preallocated and rewritten from its start once everything in it
//! is in the store, so a sync writes data blocks only (no size change, no inode
//! write): on the development VM `fdatasync` of an overwrite takes about half
//! as long as of an append. Frames are recognised by their MAC and by ids that
//! follow one another, so the stale frames after the newest ones are never
//! taken for new ones. Format: docs/format.md, "Audit journal".

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use prost::Message;
use ring::hmac;
use tokio::sync::{oneshot, watch};

use super::chain::{self, Record};
use super::{AuditError, PREFIX};
use crate::store::{Batch, Store};

/// The journal's file in the store's directory.
pub const FILE_NAME: &str = "audit.journal";
/// The newest journal id the store's log holds (u64, big-endian).
pub const FED: &[u8] = b"m\0audit.journal";
/// Domain label of a frame's MAC (no other label of the audit key starts with it,
/// nor it with another).
pub const FRAME_LABEL: &[u8] = b"credvault-audit-journal-v1";
/// Size the file is preallocated to, and rewritten within.
const FILE_BYTES: u64 = if cfg!(test) { 64 << 10 } else { 8 << 20 };
/// Bytes before a frame's body: its length (u32) and id (u64), little-endian.
const HEADER: usize = 12;
/// Bytes after it: the MAC.
const MAC: usize = chain::MAC_LEN;
/// Largest body: a record's text fields are capped at 1 KiB each.
const MAX_BODY: usize = 64 << 10;
/// Under load (the previous group held more than one record), the least time
/// between the taking of two groups (measured with `credvault bench audit`,
/// docs/performance.md).
pub const LINGER: Duration = Duration::from_micros(500);
/// How long the feeder gathers durable groups before appending them to the
/// store's log, unless a reader of the log (or a Revoke) waits for them.
const FEED_EVERY: Duration = Duration::from_millis(5);

/// Appends one frame for `body` as journal id `id` to `out`, MAC'd under the
/// audit key (the label keeps frame MACs apart from the chain's).
pub fn encode_frame(key: &hmac::Key, id: u64, body: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(body);
    let tag = frame_mac(key, &out[start..]);
    out.extend_from_slice(tag.as_ref());
}

fn frame_mac(key: &hmac::Key, header_and_body: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(FRAME_LABEL);
    ctx.update(header_and_body);
    ctx.sign()
}

/// The frames at the start of `bytes` whose MACs verify and whose ids follow
/// one another, as `(id, body)`; reading stops at the first that does not.
pub fn decode_frames<'a>(key: &hmac::Key, mut bytes: &'a [u8]) -> Vec<(u64, &'a [u8])> {
    let mut frames: Vec<(u64, &[u8])> = Vec::new();
    while bytes.len() >= HEADER + MAC {
        let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        let id = u64::from_le_bytes(bytes[4..HEADER].try_into().expect("8 bytes"));
        if len == 0 || len > MAX_BODY || bytes.len() < HEADER + len + MAC || id == 0 {
            break;
        }
        let (signed, rest) = bytes.split_at(HEADER + len);
        if hmac::verify(key, &[FRAME_LABEL, signed].concat(), &rest[..MAC]).is_err() {
            break;
        }
        if frames.last().is_some_and(|(last, _)| id != last + 1) {
            break;
        }
        frames.push((id, &signed[HEADER..]));
        bytes = &rest[MAC..];
    }
    frames
}

/// Where the journal stands: what the store holds, and whether it failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    /// Every id up to this one is in the store's log.
    fed: u64,
    /// A write, sync or feed failed: nothing more is accepted.
    failed: bool,
}

/// How an appender hears that its record is durable (or why not).
type Waiter = oneshot::Sender<Result<(), String>>;

/// What callers have queued for the next group.
#[derive(Default)]
struct Queue {
    next_id: u64,
    frames: Vec<u8>,
    records: Vec<(u64, Vec<u8>)>,
    waiters: Vec<Waiter>,
    /// The writer is waiting for work (only then is it signalled).
    idle: bool,
    stop: bool,
    failed: Option<String>,
}

struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
    progress: watch::Sender<Progress>,
    /// The audit key, which MACs frames.
    key: Arc<hmac::Key>,
    /// The feeder, and whether someone waits for it (then it feeds at once).
    feeder: std::sync::OnceLock<std::thread::Thread>,
    hurry: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Asks the feeder to feed what it holds now instead of after [`FEED_EVERY`].
    fn hurry(&self) {
        self.hurry.store(true, std::sync::atomic::Ordering::Release);
        if let Some(feeder) = self.feeder.get() {
            feeder.unpark();
        }
    }

    /// Fails the journal: `group` (a group taken from the queue) and every
    /// queued record are refused, and so is every later one.
    fn fail(&self, what: &str, error: impl std::fmt::Display, group: Vec<Waiter>) {
        let message = format!("{what}: {error}");
        tracing::error!(error = %message, "audit journal failed; audited calls are refused until a restart");
        crate::metrics::global().audit_failed.set(1);
        let mut queue = self.queue.lock().expect("journal lock");
        queue.failed.get_or_insert_with(|| message.clone());
        for waiter in group.into_iter().chain(queue.waiters.drain(..)) {
            let _ = waiter.send(Err(message.clone()));
        }
        queue.frames.clear();
        queue.records.clear();
        drop(queue);
        self.progress.send_modify(|p| p.failed = true);
    }
}

/// The audit journal of one store (see the module doc). Dropping it writes
/// and feeds what is queued, then stops its threads.
pub struct Journal {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    path: PathBuf,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, first appending to the log in
    /// `store` every frame it holds that the store does not; `audit_key`
    /// chains them, `linger` is [`LINGER`] except in benchmarks.
    pub async fn open(
        dir: &Path,
        store: Arc<dyn Store>,
        audit_key: Arc<hmac::Key>,
        linger: Duration,
    ) -> Result<Self, AuditError> {
        let path = dir.join(FILE_NAME);
        let io = |what: &str, e: std::io::Error| {
            AuditError::Journal(format!("{what} {}: {e}", path.display()))
        };
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io("opening", e))?;
        let mut fed = stored_fed(&*store)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| io("reading", e))?;
        let frames = decode_frames(&audit_key, &bytes);
        let newest = frames.last().map_or(0, |(id, _)| *id);
        let unfed: Vec<(u64, Vec<u8>)> = frames
            .into_iter()
            .filter(|(id, _)| *id > fed)
            .map(|(id, body)| {
                // Re-encoded, so that what is chained is exactly what credvault encodes.
                Record::decode(body)
                    .map(|record| {
                        (
                            id,
                            Record {
                                mac: Vec::new(),
                                ..record
                            }
                            .encode_to_vec(),
                        )
                    })
                    .map_err(|_| AuditError::Journal(format!("journal frame {id} does not decode")))
            })
            .collect::<Result<_, _>>()?;
        if let Some((last, _)) = unfed.last() {
            tracing::info!(
                records = unfed.len(),
                last_id = last,
                "audit journal: appending records acknowledged before the last stop"
            );
            let last = *last;
            store.commit(feed_batch(&audit_key, unfed)).await?;
            fed = last;
        }
        drop(bytes);
        if file.metadata().map_err(|e| io("reading", e))?.len() < FILE_BYTES {
            preallocate(&mut file).map_err(|e| io("preallocating", e))?;
            if created {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io("syncing the directory of", e))?;
            }
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                next_id: newest.max(fed) + 1,
                ..Queue::default()
            }),
            work: Condvar::new(),
            progress: watch::Sender::new(Progress { fed, failed: false }),
            key: audit_key.clone(),
            feeder: std::sync::OnceLock::new(),
            hurry: std::sync::atomic::AtomicBool::new(false),
        });
        let (to_feed, groups) = mpsc::channel();
        let feeder = {
            let shared = shared.clone();
            spawn("credvault-audit-feed", move || {
                feed(&shared, &*store, &audit_key, groups)
            })?
        };
        let _ = shared.feeder.set(feeder.thread().clone());
        let writer = {
            let shared = shared.clone();
            spawn("credvault-audit-journal", move || {
                write(&shared, file, linger, to_feed)
            })?
        };
        Ok(Self {
            shared,
            threads: Mutex::new(vec![writer, feeder]),
            path,
        })
    }

    /// Makes `record` durable in the journal; resolves once it is (it reaches
    /// the store's log a moment later). Fails if the journal has failed.
    pub async fn append(&self, record: Record) -> Result<(), AuditError> {
        let body = record.encode_to_vec();
        let done = {
            let mut queue = self.shared.queue.lock().expect("journal lock");
            if let Some(failure) = &queue.failed {
                return Err(AuditError::Journal(failure.clone()));
            }
            if queue.stop {
                return Err(AuditError::Journal("the journal is closing".into()));
            }
            let id = queue.next_id;
            queue.next_id += 1;
            encode_frame(&self.shared.key, id, &body, &mut queue.frames);
            queue.records.push((id, body));
            let (done, wait) = oneshot::channel();
            queue.waiters.push(done);
            if queue.idle {
                queue.idle = false;
                self.shared.work.notify_one();
            }
            wait
        };
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(failure)) => Err(AuditError::Journal(failure)),
            Err(_) => Err(AuditError::Journal("the journal stopped".into())),
        }
    }

    /// Resolves once every record appended before this call is in the store's
    /// log (so that queries, verification and backups see it); fails if the
    /// journal failed first.
    pub async fn settled(&self) -> Result<(), AuditError> {
        let target = self.shared.queue.lock().expect("journal lock").next_id - 1;
        let mut progress = self.shared.progress.subscribe();
        if progress.borrow().fed < target {
            self.shared.hurry();
        }
        let reached = progress
            .wait_for(|p| p.fed >= target || p.failed)
            .await
            .map_err(|_| AuditError::Journal("the journal stopped".into()))?;
        if reached.fed >= target {
            Ok(())
        } else {
            let failure = self
                .shared
                .queue
                .lock()
                .expect("journal lock")
                .failed
                .clone();
            Err(AuditError::Journal(failure.unwrap_or_default()))
        }
    }

    /// [`Self::settled`] for synchronous callers (it needs no runtime).
    pub fn settled_blocking(&self) -> Result<(), AuditError> {
        block_on(self.settled())
    }

    /// Why the journal failed (it then refuses every record until a restart).
    pub fn failure(&self) -> Option<String> {
        self.shared
            .queue
            .lock()
            .expect("journal lock")
            .failed
            .clone()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shared.queue.lock().expect("journal lock").stop = true;
        self.shared.work.notify_all();
        for thread in self.threads.get_mut().expect("journal threads").drain(..) {
            let _ = thread.join();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, AuditError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| AuditError::Journal(format!("starting a journal thread: {e}")))
}

fn stored_fed(store: &dyn Store) -> Result<u64, AuditError> {
    match store.get(FED)? {
        None => Ok(0),
        Some(bytes) => bytes
            .as_slice()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| AuditError::Journal("m\\0audit.journal is not a u64".into())),
    }
}

fn preallocate(file: &mut File) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < FILE_BYTES {
        let n = zeros.len().min((FILE_BYTES - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.flush()?;
    file.sync_all()
}

/// A record as stored, and its MAC.
type Chained = (Vec<u8>, [u8; chain::MAC_LEN]);

/// One store batch appending `records` (their bodies) to the audit log, in
/// id order, and recording the newest id as fed.
fn feed_batch(audit_key: &Arc<hmac::Key>, records: Vec<(u64, Vec<u8>)>) -> Batch {
    // The last record this batch chained, and its MAC: the next one's link
    // without decoding it again (any other previous value is linked as usual).
    let last: Arc<Mutex<Option<Chained>>> = Arc::default();
    let mut batch = Batch::default();
    let mut newest = 0;
    for (id, body) in records {
        newest = id;
        let key = audit_key.clone();
        let last = last.clone();
        batch.append(PREFIX.to_vec(), move |seq, previous| {
            let mut last = last.lock().expect("feed lock");
            let prev_mac = match (last.as_ref(), previous) {
                (Some((value, mac)), Some(previous)) if value.as_slice() == previous => *mac,
                _ => chain::link(&key, previous),
            };
            let value = chain::seal_body(&key, seq, &prev_mac, &body);
            let mac = value[value.len() - chain::MAC_LEN..]
                .try_into()
                .expect("a MAC at the end");
            *last = Some((value.clone(), mac));
            value
        });
    }
    batch.put(FED.to_vec(), newest.to_be_bytes().to_vec());
    batch
}

/// The writer thread: one write and one sync per group.
fn write(
    shared: &Shared,
    file: File,
    linger: Duration,
    to_feed: mpsc::Sender<Vec<(u64, Vec<u8>)>>,
) {
    let mut at = 0u64;
    let mut last_group = 0usize;
    let mut spare: (Vec<u8>, Vec<Waiter>) = Default::default();
    let mut written = shared.progress.borrow().fed;
    let mut last_taken = std::time::Instant::now();
    loop {
        let mut queue = shared.queue.lock().expect("journal lock");
        while queue.waiters.is_empty() && !queue.stop {
            queue.idle = true;
            queue = shared.work.wait(queue).expect("journal lock");
        }
        queue.idle = false;
        if queue.waiters.is_empty() {
            return; // stopping, nothing queued; dropping `to_feed` stops the feeder
        }
        // Under load, a group is taken no sooner than `linger` after the last
        // one was: the time that one spent in its sync, and waiting for this
        // one's first record, counts towards the linger.
        let wait = (last_taken + linger).saturating_duration_since(std::time::Instant::now());
        if last_group > 1 && !wait.is_zero() && !queue.stop {
            drop(queue);
            std::thread::sleep(wait);
            queue = shared.queue.lock().expect("journal lock");
            if queue.failed.is_some() {
                continue;
            }
        }
        // The buffers of the last group go back, emptied, so that appenders
        // do not grow new ones from nothing for every group.
        let mut frames = std::mem::replace(&mut queue.frames, std::mem::take(&mut spare.0));
        let records = std::mem::take(&mut queue.records);
        last_taken = std::time::Instant::now();
        let mut waiters = std::mem::replace(&mut queue.waiters, std::mem::take(&mut spare.1));
        drop(queue);
        last_group = waiters.len();
        if at + frames.len() as u64 > FILE_BYTES {
            // Rewrite from the start once every frame in the file is in the store.
            let mut progress = shared.progress.subscribe();
            shared.hurry();
            let fed = block_on(progress.wait_for(|p| p.fed >= written || p.failed))
                .map(|p| !p.failed)
                .unwrap_or(false);
            if !fed {
                let why = "the journal's feed into the store failed";
                shared.fail(why, "refusing audited calls", waiters);
                continue;
            }
            at = 0;
        }
        let started = std::time::Instant::now();
        let result = file
            .write_all_at(&frames, at)
            .and_then(|()| file.sync_data());
        crate::metrics::global()
            .audit_journal_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Err(error) = result {
            shared.fail("writing the audit journal", error, waiters);
            continue;
        }
        at += frames.len() as u64;
        written = records.last().map_or(written, |(id, _)| *id);
        for waiter in waiters.drain(..) {
            let _ = waiter.send(Ok(()));
        }
        frames.clear();
        spare = (frames, waiters);
        let _ = to_feed.send(records); // the feeder stops only after this thread
    }
}

/// The feeder thread: each durable group into the store's log, as one batch.
fn feed(
    shared: &Shared,
    store: &dyn Store,
    audit_key: &Arc<hmac::Key>,
    groups: mpsc::Receiver<Vec<(u64, Vec<u8>)>>,
) {
    while let Ok(mut records) = groups.recv() {
        if !shared
            .hurry
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            std::thread::park_timeout(FEED_EVERY);
            shared
                .hurry
                .store(false, std::sync::atomic::Ordering::Release);
        }
        while let Ok(more) = groups.try_recv() {
            records.extend(more);
        }
        if shared.progress.borrow().failed {
            continue; // drain, so the writer never blocks on a full channel
        }
        let Some(&(newest, _)) = records.last() else {
            continue;
        };
        match block_on(store.commit(feed_batch(audit_key, records))) {
            Ok(_) => shared.progress.send_modify(|p| p.fed = newest),
            Err(error) => {
                shared.fail("appending journal records to the store", error, Vec::new());
            }
        }
    }
}

/// Runs `future` to completion on this thread, parking between polls: for the
/// journal's threads, which await the store's commits and the feed's
/// progress, neither of which needs a runtime.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    // Outside tokio's cooperative budget: called on a runtime's thread, a
    // spent budget would make every poll return Pending (and wake at once).
    let mut future = std::pin::pin!(tokio::task::unconstrained(future));
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => return output,
            Poll::Pending => std::thread::park(),
        }
    }
}

#[cfg(test)]
#[path = "journal_tests.rs"]
mod tests;
