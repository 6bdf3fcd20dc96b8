//! `credvault bench journal`: the ceiling, on this machine, of a call that
//! makes its audit record durable (written and fdatasync'd) before it
//! returns, with the leanest group-commit journal we can think of.
//!
//! The model, in-process, on the CLI's tokio runtime (one worker per core):
//! `in_flight` tasks (then twice as many) each loop on one "call": a calibrated
//! CPU burn of `work_us` standing in for everything else an Unseal costs
//! (TLS, HTTP/2, protobuf, policy, the store's read and AES-GCM), then
//! - **records off**: `yield_now`;
//! - **records on**: a ~300-byte record is built; under one `std` mutex it
//!   gets the next sequence number and its chain MAC (HMAC-SHA256 over the
//!   previous MAC ‖ seq ‖ length ‖ record), the entry (seq ‖ length ‖ record ‖
//!   MAC) is appended to a shared buffer and a oneshot is queued; the task
//!   awaits it. One `journal-writer` thread takes the whole buffer and its
//!   waiters, does one write + `sync_data` (fdatasync) on a file in a
//!   temporary directory, then wakes every waiter: group commit. The file is
//!   preallocated (64 MiB of zeros) and overwritten from its start once full,
//!   as the product's journal is, so a sync writes data blocks only; with
//!   `append` it grows instead, and every sync also commits its new size (the
//!   model before session 11, about half as fast a sync on the development
//!   VM).
//!
//! It leaves out everything but the CPU stand-in: no TLS, no HTTP/2, no
//! store, no B-tree or index over the records, no second copy, no record
//! serialisation beyond one `write!`. So it is an upper bound for a server
//! whose journal commits this way: a real one spends at least this much per
//! durable record, and its other work competes for the same two cores and
//! the same disk flush. With `linger_us` 0 the writer flushes as soon as
//! anything is pending (greedy group commit), so groups stay as small as the
//! flush is fast and the per-flush CPU (syscalls, wake-ups, ext4's journal
//! commit for the growing file) is paid often; with `linger_us` > 0 it takes
//! a group no sooner than that long after it took the last one (once that
//! held more than one record), trading latency for fewer, bigger flushes: the
//! product's journal's rule since session 12 (until then both waited that
//! long after a group's first record).
//!
//! On and off run in `rounds` interleaved slices (on, off, then the reverse,
//! …) after a warm-up, so that drift in the VM's disk latency or in other
//! load weighs on both alike. Afterwards the journal file is read back: its
//! chain must verify and end at the entry of the last records-on call (when
//! overwritten, from the first entry of its last lap, chained to the MAC of
//! the entry before it).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use ring::hmac;
use serde::Serialize;
use tokio::sync::oneshot;

use super::{Bar, CpuSample, CpuWindow, Report, Row};

/// Parameters of the journal benchmark.
#[derive(Debug, Clone)]
pub struct Params {
    /// Calls kept in flight (one task each) in the first pair of rows; the
    /// second pair runs twice as many.
    pub in_flight: usize,
    /// CPU burnt per call standing in for the rest of an Unseal, in µs.
    pub work_us: u64,
    /// Least time between the taking of two groups under load, in µs (0:
    /// greedy group commit).
    pub linger_us: u64,
    /// Append to a growing file (each sync also writes its new size) instead
    /// of overwriting a preallocated one, as the product's journal does.
    pub append: bool,
    /// How long each row is measured, after its warm-up.
    pub seconds: f64,
    /// Warm-up before each row's first slice; later slices get 0.25 s.
    pub warmup_seconds: f64,
    /// Each row's `seconds` are split into this many interleaved slices.
    pub rounds: u32,
    /// Where the JSON goes.
    pub out: PathBuf,
}

/// Bytes of one record (a stand-in for an audit record of an Unseal).
const RECORD_BYTES: usize = 300;
const MAC_BYTES: usize = 32;
/// seq (u64) ‖ record length (u32), big-endian.
const HEADER_BYTES: usize = 12;
/// Settle before every slice after a row's first.
const SETTLE_SECONDS: f64 = 0.25;
/// Size of the preallocated file the writer overwrites, from its start again
/// once full (unless `append`).
const OVERWRITE_BYTES: u64 = if cfg!(test) { 1 << 20 } else { 64 << 20 };
/// The bar of issue 5: audited / unaudited Unseal throughput.
const BAR: f64 = 0.85;

/// The report, with what the ratios alone do not say.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    #[serde(flatten)]
    pub report: Report,
    pub work: Work,
    /// Tokio worker threads (the journal writer is one more thread).
    pub workers: usize,
    /// Filesystem of the journal file.
    pub filesystem: String,
    /// Group commit in each records-on row's timed window.
    pub journal: Vec<SyncStats>,
    pub check: JournalCheck,
    /// CPU per row (its timed windows), in cores.
    pub cpu: Vec<CpuWindow>,
}

/// The calibrated CPU stand-in.
#[derive(Debug, Clone, Serialize)]
pub struct Work {
    pub work_us: u64,
    /// Iterations of the burn loop per call.
    pub iterations: u64,
    /// One call's burn, measured after calibration on an idle runtime.
    pub measured_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyncStats {
    pub row: String,
    pub in_flight: usize,
    pub syncs: u64,
    pub records: u64,
    pub seconds: f64,
    pub syncs_per_sec: f64,
    pub records_per_sync: f64,
    /// Mean time of one `write_all` + `sync_data`, µs.
    pub mean_sync_us: f64,
}

/// The journal file read back after the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JournalCheck {
    /// Records-on calls that completed (warm-up included).
    pub calls: u64,
    pub entries: u64,
    pub bytes: u64,
    pub verify_ok: bool,
    pub reason: String,
    pub pass: bool,
}

impl Results {
    /// Prints the table and the journal, CPU and check lines, and writes the
    /// JSON to `out`.
    pub fn finish(&self, out: &Path) -> std::io::Result<()> {
        print!("{}", self.report.table());
        for s in &self.journal {
            println!(
                "journal, {}: {} syncs in {:.1} s, {:.0} syncs/s, {:.1} records per sync, \
                 write + fdatasync {:.0} µs mean",
                s.row, s.syncs, s.seconds, s.syncs_per_sec, s.records_per_sync, s.mean_sync_us
            );
        }
        for c in &self.cpu {
            println!(
                "cpu, {}: {:.1} s, process {:.2} cores, others {:.2}, machine busy {:.2} of {:.0}",
                c.phase, c.seconds, c.process, c.others, c.machine_busy, c.machine_cores
            );
        }
        let c = &self.check;
        println!(
            "journal file: {} entries ({} bytes) for {} records-on calls, chain verify {}{}: {}",
            c.entries,
            c.bytes,
            c.calls,
            if c.verify_ok { "ok" } else { "FAILED" },
            if c.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.reason)
            },
            if c.pass { "PASS" } else { "FAIL" }
        );
        let others = self.cpu.iter().map(|c| c.others).fold(0.0, f64::max);
        if others > 0.25 {
            println!(
                "WARNING: other processes used up to {others:.2} cores during a row: \
                 the figures are not clean"
            );
        }
        super::write_json(out, self)
    }

    /// An error if the journal file did not hold what the calls wrote: then
    /// the ratios measure nothing.
    pub fn passed(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.check.pass,
            "bench journal: the journal file holds {} verified entries for {} calls ({})",
            self.check.entries,
            self.check.calls,
            self.check.reason
        );
        Ok(())
    }
}

/// Runs the scenario on the current (multi-thread) runtime.
pub async fn run(params: &Params) -> anyhow::Result<Results> {
    anyhow::ensure!(params.in_flight > 0, "--in-flight must be at least 1");
    anyhow::ensure!(params.seconds > 0.0, "--seconds must be positive");
    anyhow::ensure!(params.rounds > 0, "--rounds must be at least 1");

    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let work = calibrate(params.work_us);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("journal");
    let filesystem = filesystem(dir.path());
    let key = hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("no random HMAC key"))?;
    let linger = Duration::from_micros(params.linger_us);
    let (journal, writer) = Journal::start(&path, key.clone(), linger, !params.append)?;
    let commit = if linger.is_zero() {
        "greedy group commit".to_owned()
    } else {
        format!("group commit lingering {} µs", params.linger_us)
    };
    let commit = match params.append {
        true => format!("{commit}, appending to a growing file"),
        false => format!(
            "{commit}, overwriting a preallocated {} MiB file",
            OVERWRITE_BYTES >> 20
        ),
    };

    let mut report = Report::new("journal");
    report.scenario = format!(
        "journal: {commit}, durable before return; {} µs CPU per call \
         ({} iterations, measured {:.1} µs), {workers} tokio workers + 1 writer thread; \
         {} and {} in flight, {} s per row in {} interleaved slices, {} s warm-up; \
         journal on {filesystem}",
        work.work_us,
        work.iterations,
        work.measured_us,
        params.in_flight,
        params.in_flight * 2,
        params.seconds,
        params.rounds,
        params.warmup_seconds,
    );
    report.machine = super::grpc::machine();
    if filesystem.starts_with("tmpfs") || filesystem.starts_with("ramfs") {
        eprintln!("WARNING: the journal is on {filesystem}: fdatasync is free there");
    }

    let measured = async {
        let mut cpu = Vec::new();
        let mut stats = Vec::new();
        let mut calls = 0;
        for in_flight in [params.in_flight, params.in_flight * 2] {
            calls += rows(
                params,
                in_flight,
                work.iterations,
                &journal,
                &mut report,
                &mut cpu,
                &mut stats,
            )
            .await?;
        }
        anyhow::Ok((cpu, stats, calls))
    }
    .await;
    let stopped = writer.stop();
    let (cpu, stats, calls) = measured?;
    stopped?;

    eprintln!("reading the journal back…");
    // Overwritten from its start once full: only the last lap can be read
    // back, from the entry it started with, chained to the MAC before it.
    let lap = journal.lap();
    let mut check = JournalCheck {
        calls,
        bytes: lap.bytes,
        ..JournalCheck::default()
    };
    let reader = io::BufReader::new(File::open(&path)?);
    match verify_from(&key, reader, lap.bytes, lap.after_seq, &lap.after_mac) {
        Ok(entries) => {
            check.entries = entries;
            check.verify_ok = true;
        }
        Err(e) => check.reason = format!("{e:#}"),
    }
    check.pass = check.verify_ok && check.entries == calls;
    if check.verify_ok && !check.pass {
        check.reason = "entries ≠ calls".into();
    }

    let rate = |name: &str| report.row(name).map_or(0.0, |r| r.ops_per_sec);
    let bars: Vec<_> = [params.in_flight, params.in_flight * 2]
        .into_iter()
        .map(|in_flight| {
            Bar::new(
                format!("journal ceiling: on / off, {in_flight} in flight"),
                rate(&row_name(true, in_flight)) / rate(&row_name(false, in_flight)),
                BAR,
            )
        })
        .collect();
    report.bars = bars;
    Ok(Results {
        report,
        work,
        workers,
        filesystem,
        journal: stats,
        check,
        cpu,
    })
}

fn row_name(records: bool, in_flight: usize) -> String {
    if records {
        format!("{in_flight} in flight, records on (fdatasync)")
    } else {
        format!("{in_flight} in flight, records off")
    }
}

/// The on and off rows at `in_flight`, interleaved; returns the records-on
/// calls that completed (warm-up included).
async fn rows(
    params: &Params,
    in_flight: usize,
    iterations: u64,
    journal: &Arc<Journal>,
    report: &mut Report,
    cpu: &mut Vec<CpuWindow>,
    stats: &mut Vec<SyncStats>,
) -> anyhow::Result<u64> {
    let slice = params.seconds / params.rounds as f64;
    // [off, on]: ops, elapsed, latencies, CPU, group commit.
    let mut totals: [(u64, Duration, Vec<Duration>, CpuWindow, Counters); 2] = Default::default();
    let mut calls = 0;
    for round in 0..params.rounds {
        let order = if round % 2 == 0 { [1, 0] } else { [0, 1] };
        let warmup = if round == 0 {
            params.warmup_seconds
        } else {
            params.warmup_seconds.min(SETTLE_SECONDS)
        };
        for k in order {
            let on = k == 1;
            eprintln!(
                "round {}/{}: {}…",
                round + 1,
                params.rounds,
                row_name(on, in_flight)
            );
            let journal = on.then(|| journal.clone());
            let m = load(journal, in_flight, iterations, warmup, slice).await?;
            let total = &mut totals[k];
            total.0 += m.latencies.len() as u64;
            total.1 += m.elapsed;
            total.2.extend(m.latencies);
            total.3.add(&m.cpu);
            total.4.add(&m.group);
            if on {
                calls += m.completed;
            }
        }
    }
    for (k, (ops, elapsed, mut latencies, window, group)) in totals.into_iter().enumerate() {
        let name = row_name(k == 1, in_flight);
        report
            .rows
            .push(Row::new(&name, ops, elapsed, Some(&mut latencies)));
        if k == 1 {
            let seconds = elapsed.as_secs_f64();
            stats.push(SyncStats {
                row: name.clone(),
                in_flight,
                syncs: group.syncs,
                records: group.records,
                seconds,
                syncs_per_sec: group.syncs as f64 / seconds,
                records_per_sync: group.records as f64 / group.syncs.max(1) as f64,
                mean_sync_us: group.sync_ns as f64 / 1e3 / group.syncs.max(1) as f64,
            });
        }
        cpu.push(CpuWindow {
            phase: name,
            ..window.average()
        });
    }
    Ok(calls)
}

/// One slice's measurement.
struct Measured {
    /// Latencies of the calls that completed in the timed window.
    latencies: Vec<Duration>,
    elapsed: Duration,
    /// Calls that completed, warm-up included.
    completed: u64,
    /// CPU and group commit over the timed window.
    cpu: CpuWindow,
    group: Counters,
}

/// `in_flight` tasks looping on calls (with records if `journal` is given)
/// for `warmup_seconds` and then `seconds`.
async fn load(
    journal: Option<Arc<Journal>>,
    in_flight: usize,
    iterations: u64,
    warmup_seconds: f64,
    seconds: f64,
) -> anyhow::Result<Measured> {
    let begin = Instant::now() + Duration::from_secs_f64(warmup_seconds);
    let end = begin + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..in_flight)
        .map(|task| {
            let journal = journal.clone();
            tokio::spawn(async move {
                let mut record = Vec::with_capacity(RECORD_BYTES);
                let mut latencies = Vec::with_capacity(1 << 12);
                let mut completed = 0u64;
                loop {
                    let started = Instant::now();
                    if started >= end {
                        break;
                    }
                    std::hint::black_box(burn(iterations));
                    match &journal {
                        None => tokio::task::yield_now().await,
                        Some(journal) => {
                            fill_record(&mut record, task, completed)?;
                            journal.append(&record).await?;
                        }
                    }
                    let done = Instant::now();
                    completed += 1;
                    if done >= begin && done < end {
                        latencies.push(done - started);
                    }
                }
                anyhow::Ok((latencies, completed))
            })
        })
        .collect();
    tokio::time::sleep_until(begin.into()).await;
    let (cpu_before, group_before) = (CpuSample::now(), counters(&journal));
    tokio::time::sleep_until(end.into()).await;
    let cpu = CpuSample::now().since(&cpu_before);
    let group = counters(&journal).since(&group_before);
    let mut latencies = Vec::new();
    let mut completed = 0;
    for task in tasks {
        let (l, n) = task.await??;
        latencies.extend(l);
        completed += n;
    }
    Ok(Measured {
        latencies,
        elapsed: end - begin,
        completed,
        cpu,
        group,
    })
}

/// Spins the CPU for `iterations` dependent multiply-rotate steps.
fn burn(iterations: u64) -> u64 {
    let mut x = std::hint::black_box(0x9e37_79b9_7f4a_7c15_u64);
    for i in 0..std::hint::black_box(iterations) {
        x = (x ^ i).wrapping_mul(0xbf58_476d_1ce4_e5b9).rotate_left(17);
    }
    x
}

/// The burn iterations that take `work_us` on this thread (the fastest of a
/// few probes, so that a preemption does not inflate the count).
fn calibrate(work_us: u64) -> Work {
    const PROBE: u64 = 1 << 20;
    let fastest = (0..7)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(burn(PROBE));
            t.elapsed()
        })
        .min()
        .unwrap_or(Duration::from_millis(1))
        .max(Duration::from_nanos(1));
    let per_us = PROBE as f64 / (fastest.as_secs_f64() * 1e6);
    let iterations = (work_us as f64 * per_us).round() as u64;
    const CALLS: u32 = 500;
    let t = Instant::now();
    for _ in 0..CALLS {
        std::hint::black_box(burn(iterations));
    }
    Work {
        work_us,
        iterations,
        measured_us: t.elapsed().as_secs_f64() * 1e6 / CALLS as f64,
    }
}

/// A stand-in for an Unseal's audit record, padded to [`RECORD_BYTES`].
fn fill_record(out: &mut Vec<u8>, task: usize, call: u64) -> io::Result<()> {
    out.clear();
    write!(
        out,
        r#"{{"rpc":"Unseal","outcome":"ok","caller":"executor","tenant":"tenant-{:04}","credential":"cred-{:08}","version":1,"purpose":"bench journal","task":{task},"call":{call},"pad":""#,
        task % 1000,
        call
    )?;
    out.resize(out.len().max(RECORD_BYTES - 2), b' ');
    out.extend_from_slice(b"\"}");
    Ok(())
}

/// Appends one entry, seq ‖ length ‖ record ‖ MAC, to `out`, chained to
/// `previous` (the MAC of the entry before, zeros for the first); returns its
/// MAC.
fn append_entry(
    key: &hmac::Key,
    previous: &[u8; MAC_BYTES],
    seq: u64,
    record: &[u8],
    out: &mut Vec<u8>,
) -> anyhow::Result<[u8; MAC_BYTES]> {
    let length = u32::try_from(record.len()).context("record too long")?;
    let start = out.len();
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(record);
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(previous);
    ctx.update(&out[start..]);
    let mut mac = [0; MAC_BYTES];
    mac.copy_from_slice(ctx.sign().as_ref());
    out.extend_from_slice(&mac);
    Ok(mac)
}

/// Reads `bytes` of journal entries from `reader` and checks the chain:
/// sequence numbers 1, 2, … and every MAC. Returns the entries.
#[cfg(test)]
fn verify(key: &hmac::Key, reader: impl Read, bytes: u64) -> anyhow::Result<u64> {
    verify_from(key, reader, bytes, 0, &[0; MAC_BYTES])
}

/// [`verify`] of entries that follow entry `after_seq`, whose MAC is
/// `after_mac`. Returns the last sequence number.
fn verify_from(
    key: &hmac::Key,
    mut reader: impl Read,
    bytes: u64,
    after_seq: u64,
    after_mac: &[u8; MAC_BYTES],
) -> anyhow::Result<u64> {
    let (mut previous, mut seq, mut read) = (*after_mac, after_seq, 0u64);
    let mut entry = Vec::new();
    while read < bytes {
        let mut header = [0; HEADER_BYTES];
        reader
            .read_exact(&mut header)
            .with_context(|| format!("entry {} truncated", seq + 1))?;
        let (seq_bytes, length) = header.split_at(8);
        let got = u64::from_be_bytes(seq_bytes.try_into()?);
        anyhow::ensure!(got == seq + 1, "entry {} has sequence {got}", seq + 1);
        let length = u32::from_be_bytes(length.try_into()?) as usize;
        anyhow::ensure!(
            read + (HEADER_BYTES + length + MAC_BYTES) as u64 <= bytes,
            "entry {got} runs past the end"
        );
        entry.clear();
        entry.resize(HEADER_BYTES + length + MAC_BYTES, 0);
        entry[..HEADER_BYTES].copy_from_slice(&header);
        reader
            .read_exact(&mut entry[HEADER_BYTES..])
            .with_context(|| format!("entry {got} truncated"))?;
        let (body, mac) = entry.split_at(HEADER_BYTES + length);
        let mut ctx = hmac::Context::with_key(key);
        ctx.update(&previous);
        ctx.update(body);
        anyhow::ensure!(
            ctx.sign().as_ref() == mac,
            "entry {got}: MAC does not match"
        );
        previous.copy_from_slice(mac);
        seq = got;
        read += entry.len() as u64;
    }
    Ok(seq)
}

/// Group-commit counters (totals, or a window's differences).
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    syncs: u64,
    records: u64,
    sync_ns: u64,
}

impl Counters {
    fn since(&self, earlier: &Self) -> Self {
        Self {
            syncs: self.syncs - earlier.syncs,
            records: self.records - earlier.records,
            sync_ns: self.sync_ns - earlier.sync_ns,
        }
    }

    fn add(&mut self, other: &Self) {
        self.syncs += other.syncs;
        self.records += other.records;
        self.sync_ns += other.sync_ns;
    }
}

fn counters(journal: &Option<Arc<Journal>>) -> Counters {
    journal
        .as_ref()
        .map_or_else(Counters::default, |j| Counters {
            syncs: j.syncs.load(Ordering::Relaxed),
            records: j.records.load(Ordering::Relaxed),
            sync_ns: j.sync_ns.load(Ordering::Relaxed),
        })
}

/// The journal: one mutex over the chain head, the pending bytes and their
/// waiters; one writer thread.
struct Journal {
    key: hmac::Key,
    /// How long the writer waits after a group's first record.
    linger: Duration,
    state: Mutex<State>,
    /// Signalled when the buffer becomes non-empty, or on stop.
    ready: Condvar,
    syncs: AtomicU64,
    records: AtomicU64,
    sync_ns: AtomicU64,
    /// Overwrite the preallocated file instead of appending.
    overwrite: bool,
    /// What the file holds of the current lap.
    lap: Mutex<Lap>,
}

/// The entries of the file's current lap: `bytes` from its start, following
/// entry `after_seq` (MAC `after_mac`).
#[derive(Debug, Clone, Copy, Default)]
struct Lap {
    bytes: u64,
    after_seq: u64,
    after_mac: [u8; MAC_BYTES],
}

#[derive(Default)]
struct State {
    seq: u64,
    mac: [u8; MAC_BYTES],
    buffer: Vec<u8>,
    waiters: Vec<oneshot::Sender<()>>,
    /// Set to stop the writer; once it has stopped, appends fail.
    stop: bool,
}

/// The writer thread; stopped (and joined) by [`Writer::stop`] or on drop.
struct Writer {
    journal: Arc<Journal>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Journal {
    /// Creates the journal file at `path` and starts its writer.
    fn start(
        path: &Path,
        key: hmac::Key,
        linger: Duration,
        overwrite: bool,
    ) -> anyhow::Result<(Arc<Self>, Writer)> {
        let file = File::create_new(path)
            .with_context(|| format!("creating the journal {}", path.display()))?;
        if overwrite {
            // Written, not fallocated: an overwrite then changes no metadata.
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..(OVERWRITE_BYTES >> 20) {
                (&file).write_all(&zeros)?;
            }
            file.sync_all()?;
        }
        let journal = Arc::new(Self {
            key,
            linger,
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            syncs: AtomicU64::new(0),
            records: AtomicU64::new(0),
            sync_ns: AtomicU64::new(0),
            overwrite,
            lap: Mutex::new(Lap::default()),
        });
        let thread = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn({
                let journal = journal.clone();
                move || journal.write_loop(file)
            })?;
        let writer = Writer {
            journal: journal.clone(),
            thread: Some(thread),
        };
        Ok((journal, writer))
    }

    /// What the file holds of its current lap (after the writer stopped: all
    /// that can be read back).
    fn lap(&self) -> Lap {
        *self.lap.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Chains `record` into the journal and returns once it is durable.
    async fn append(&self, record: &[u8]) -> anyhow::Result<()> {
        let durable = {
            let mut state = self
                .state
                .lock()
                .map_err(|_| anyhow::anyhow!("journal lock poisoned"))?;
            anyhow::ensure!(!state.stop, "the journal writer has stopped");
            let state = &mut *state;
            state.seq += 1;
            state.mac = append_entry(&self.key, &state.mac, state.seq, record, &mut state.buffer)?;
            let (tx, rx) = oneshot::channel();
            state.waiters.push(tx);
            if state.waiters.len() == 1 {
                self.ready.notify_one();
            }
            rx
        };
        durable.await.map_err(|_| {
            anyhow::anyhow!("the journal writer stopped before the record was durable")
        })
    }

    /// The writer thread: group commits until stopped with nothing pending.
    /// However it ends, it leaves the journal stopped so that no append waits
    /// for it.
    fn write_loop(&self, mut file: File) -> io::Result<()> {
        let result = self.commit_groups(&mut file);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.stop = true;
        state.waiters.clear();
        result
    }

    fn commit_groups(&self, file: &mut File) -> io::Result<()> {
        let poisoned = |_| io::Error::other("journal lock poisoned");
        let (mut buffer, mut waiters) = (Vec::new(), Vec::new());
        let (mut last_taken, mut last_group) = (Instant::now(), 0);
        loop {
            {
                let mut state = self.state.lock().map_err(poisoned)?;
                while state.buffer.is_empty() && !state.stop {
                    state = self.ready.wait(state).map_err(poisoned)?;
                }
                if state.buffer.is_empty() {
                    return Ok(());
                }
                // As the product's journal: no sooner than `linger` after the
                // last group was taken, once that one held more than one record.
                let wait = (last_taken + self.linger).saturating_duration_since(Instant::now());
                if last_group > 1 && !wait.is_zero() && !state.stop {
                    drop(state);
                    std::thread::sleep(wait);
                    state = self.state.lock().map_err(poisoned)?;
                }
                std::mem::swap(&mut state.buffer, &mut buffer);
                last_taken = Instant::now();
                std::mem::swap(&mut state.waiters, &mut waiters);
                last_group = waiters.len();
            }
            let started = Instant::now();
            self.write_group(file, &buffer)?;
            file.sync_data()?;
            let took = started.elapsed().as_nanos() as u64;
            self.sync_ns.fetch_add(took, Ordering::Relaxed);
            self.syncs.fetch_add(1, Ordering::Relaxed);
            self.records
                .fetch_add(waiters.len() as u64, Ordering::Relaxed);
            buffer.clear();
            for waiter in waiters.drain(..) {
                let _ = waiter.send(()); // its task may have failed and gone
            }
        }
    }

    /// Writes one group's entries after the last ones, or, overwriting, from
    /// the start of the file when they do not fit before its end.
    fn write_group(&self, file: &mut File, buffer: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut guard = self.lap.lock().unwrap_or_else(PoisonError::into_inner);
        let lap = &mut *guard;
        if self.overwrite && lap.bytes + buffer.len() as u64 > OVERWRITE_BYTES {
            if lap.bytes == 0 {
                return Err(io::Error::other("a group larger than the journal file"));
            }
            // The new lap follows the last entry written: its MAC ends the lap.
            file.read_exact_at(&mut lap.after_mac, lap.bytes - MAC_BYTES as u64)?;
            let first = u64::from_be_bytes(buffer[..8].try_into().expect("8 bytes"));
            lap.after_seq = first - 1;
            lap.bytes = 0;
        }
        match self.overwrite {
            true => file.write_all_at(buffer, lap.bytes)?,
            false => file.write_all(buffer)?,
        }
        lap.bytes += buffer.len() as u64;
        Ok(())
    }
}

impl Writer {
    /// Stops the writer once everything pending is durable, and joins it.
    fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        {
            let mut state = self
                .journal
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            state.stop = true;
            self.journal.ready.notify_one();
        }
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("the journal writer panicked"))?
            .context("journal writer")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.shutdown(); // errors are reported by `stop`
    }
}

/// The filesystem `path` is on, from /proc/self/mounts: "TYPE (DEVICE on
/// MOUNT POINT)".
fn filesystem(path: &Path) -> String {
    let Ok(path) = path.canonicalize() else {
        return "unknown".into();
    };
    std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|mounts| {
            mounts
                .lines()
                .filter_map(|line| {
                    let mut f = line.split_whitespace();
                    let (device, at, kind) = (f.next()?, f.next()?, f.next()?);
                    path.starts_with(at)
                        .then(|| (at.len(), format!("{kind} ({device} on {at})")))
                })
                .max_by_key(|(len, _)| *len)
        })
        .map_or_else(|| "unknown".into(), |(_, fs)| fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &[7; 32])
    }

    fn journal(records: &[&[u8]]) -> Vec<u8> {
        let (key, mut out, mut mac) = (key(), Vec::new(), [0; MAC_BYTES]);
        for (i, record) in records.iter().enumerate() {
            mac = append_entry(&key, &mac, i as u64 + 1, record, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn chained_entries_verify() {
        let mut record = Vec::new();
        fill_record(&mut record, 3, 42).unwrap();
        assert_eq!(record.len(), RECORD_BYTES);
        let bytes = journal(&[&record, b"", b"third"]);
        assert_eq!(verify(&key(), &bytes[..], bytes.len() as u64).unwrap(), 3);
        assert_eq!(verify(&key(), &[][..], 0).unwrap(), 0);
    }

    #[test]
    fn tampering_reordering_and_truncation_fail() {
        let records: [&[u8]; 3] = [b"first", b"second", b"third"];
        let bytes = journal(&records);
        let len = bytes.len() as u64;
        for i in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[i] ^= 1;
            assert!(verify(&key(), &tampered[..], len).is_err(), "byte {i}");
        }
        assert!(verify(&key(), &bytes[..bytes.len() - 1], len).is_err());
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[8; 32]);
        assert!(verify(&other, &bytes[..], len).is_err());
        // The second and third entries swapped, each with its own valid MAC.
        let first = HEADER_BYTES + 5 + MAC_BYTES;
        let second = HEADER_BYTES + 6 + MAC_BYTES;
        let mut swapped = bytes[..first].to_vec();
        swapped.extend_from_slice(&bytes[first + second..]);
        swapped.extend_from_slice(&bytes[first..first + second]);
        assert!(verify(&key(), &swapped[..], len).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overwritten_file_keeps_its_last_lap_verifiable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (journal, writer) = Journal::start(&path, key(), Duration::ZERO, true).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), OVERWRITE_BYTES);
        // 4,000 entries of 344 bytes: the 1 MiB file is overwritten a few times.
        let mut record = Vec::new();
        for seq in 0..4_000u64 {
            record.clear();
            fill_record(&mut record, 1, seq).unwrap();
            journal.append(&record).await.unwrap();
        }
        writer.stop().unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            OVERWRITE_BYTES,
            "never grows"
        );
        let lap = journal.lap();
        assert!(lap.after_seq > 0, "it wrapped: {lap:?}");
        let read_back = |after_mac: &[u8; MAC_BYTES]| {
            let file = io::BufReader::new(File::open(&path).unwrap());
            verify_from(&key(), file, lap.bytes, lap.after_seq, after_mac)
        };
        assert_eq!(read_back(&lap.after_mac).unwrap(), 4_000);
        // Another starting MAC does not verify.
        assert!(read_back(&[1; MAC_BYTES]).is_err());
    }
}
