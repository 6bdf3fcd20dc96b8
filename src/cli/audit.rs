//! `credvault audit …`: the audit log of a running server (Admin `QueryAudit`
//! and `VerifyAudit`), or, for `verify` and `export` with `--data-dir`, of a
//! copy of a stopped server's store ([`OfflineCopy`]: the directory itself is
//! never written).
//!
//! The online commands connect like the client commands (`--server`, `--dir`,
//! `--ca`, `--cert`, `--key`, the same `CREDVAULT_*` variables), with the admin
//! dev certificate by default. Records are printed as JSON lines, oldest first:
//! `sequence`, `at_ms`, `caller`, `rpc`, `tenant_id`, `credential_id`,
//! `version`, `purpose`, `outcome` and `mac` (the record's chain MAC in hex:
//! an exported copy shows a later edit or truncation of the live log).
//!
//! Every `QueryAudit` call is itself audited. `query` and `export` print what
//! the log holds, so a long export also shows the records of its own earlier
//! page calls; `tail` leaves out the records of its own calls (it finds the end
//! of the log with a few probing calls, and `--follow` polls twice a second).
//!
//! `verify` exits 0 when the chain verifies and 2 when it is broken, naming the
//! first bad sequence number; any other failure exits 1.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand};
use credvault::audit::Head;
use credvault::service::pb::{self, admin_client::AdminClient};

use super::client::{Connection, status as status_error};
use super::keys::{admin, load_root};

/// The exit code of `verify` when the chain is broken.
const BROKEN_EXIT_CODE: i32 = 2;
/// Most records a `QueryAudit` page holds (the server's cap).
const MAX_PAGE: u64 = 1000;
/// How often `tail --follow` asks for newer records.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Records matching the filters, oldest first, as JSON lines.
    Query {
        #[command(flatten)]
        conn: Connection,
        /// Only this tenant's records (required when the certificate's grant is narrowed
        /// to some tenants, as the settings role's is).
        #[arg(long)]
        tenant: Option<String>,
        /// Only this credential's records.
        #[arg(long)]
        credential: Option<String>,
        /// Only this caller's records (the certificate identity, e.g.
        /// spiffe://credvault/executor/dev).
        #[arg(long)]
        caller: Option<String>,
        /// At or after this time: RFC 3339 (2026-01-31T12:00:00Z) or ms since the Unix epoch.
        #[arg(long, value_parser = parse_time)]
        from: Option<u64>,
        /// Strictly before this time: RFC 3339 or ms since the Unix epoch.
        #[arg(long, value_parser = parse_time)]
        to: Option<u64>,
        /// Only this outcome: `ok` or a reason code (PERMISSION_DENIED, REVOKED, …).
        #[arg(long)]
        outcome: Option<String>,
        /// Print at most this many records (0: all).
        #[arg(long, default_value_t = 1000)]
        limit: u64,
    },
    /// The newest records (leaving out this command's own calls), as JSON lines; with
    /// --follow, newer ones as they come until Ctrl-C or SIGTERM.
    Tail {
        #[command(flatten)]
        conn: Connection,
        /// How many of the newest records to print.
        #[arg(short = 'n', long = "lines", default_value_t = 20)]
        lines: u64,
        /// Keep printing newer records (polls twice a second) until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Every record after a sequence number, oldest first, as JSON lines. Online by
    /// default (QueryAudit); with --data-dir, offline from a copy of a stopped server's
    /// store (the data directory itself is not written).
    Export {
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        offline: Offline,
        /// Start after this sequence number (0: from the oldest record kept).
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Verify the HMAC chain: exit 0 when it holds, 2 when it is broken. Online by
    /// default (VerifyAudit); with --data-dir, offline on a copy of a stopped server's
    /// store (the data directory itself is not written).
    Verify {
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        offline: Offline,
        /// A head kept from earlier (SEQUENCE:MAC, as `verify` prints it and the server
        /// logs it as "audit head"): the log must still hold that record, which catches
        /// the newest records being cut off.
        // Parsed after clap, so that a malformed head exits 1, not 2 as a broken chain.
        #[arg(long)]
        seen: Option<String>,
    },
}

/// `--data-dir` and what goes with it: the offline `verify` and `export`.
#[derive(Debug, Args)]
#[group(skip)]
#[command(group(
    ArgGroup::new("root_key").args(["root_key_file", "root_key_env"]).multiple(false)
))]
struct Offline {
    /// Offline: the store directory (the config's data_dir; `data/store` under a
    /// `credvault dev` directory). The server must be stopped: the store is locked while
    /// it runs. The directory is copied (into --scratch) and the copy opened, so nothing
    /// in it changes.
    #[arg(long, requires = "root_key")]
    data_dir: Option<PathBuf>,
    /// With --data-dir: the root key file.
    #[arg(long, requires = "data_dir")]
    root_key_file: Option<PathBuf>,
    /// With --data-dir: the environment variable holding the root key (base64).
    #[arg(long, requires = "data_dir")]
    root_key_env: Option<String>,
    /// With --data-dir: where the copy goes (a directory created and removed inside it;
    /// it needs room for the whole store) [default: the system's temporary directory,
    /// $TMPDIR or /tmp].
    #[arg(long, requires = "data_dir")]
    scratch: Option<PathBuf>,
}

fn parse_head(text: Option<String>) -> anyhow::Result<Option<Head>> {
    text.map(|text| {
        text.trim()
            .parse()
            .with_context(|| format!("--seen {text:?}"))
    })
    .transpose()
}

/// What `verify` found.
pub(super) enum Verdict {
    Ok,
    Broken,
}

pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let verdict = runtime.block_on(execute(args.command));
    drop(runtime);
    match verdict? {
        Verdict::Ok => Ok(()),
        Verdict::Broken => {
            std::io::stdout().flush()?;
            std::process::exit(BROKEN_EXIT_CODE);
        }
    }
}

async fn execute(command: AuditCommand) -> anyhow::Result<Verdict> {
    match command {
        AuditCommand::Query {
            conn,
            tenant,
            credential,
            caller,
            from,
            to,
            outcome,
            limit,
        } => {
            let request = pb::QueryAuditRequest {
                tenant_id: tenant.unwrap_or_default(),
                credential_id: credential.unwrap_or_default(),
                caller: caller.unwrap_or_default(),
                from_ms: from.unwrap_or(0),
                to_ms: to.unwrap_or(0),
                outcome: outcome.unwrap_or_default(),
                page_size: 0,
                page_token: String::new(),
            };
            query(&conn, request, limit).await?;
        }
        AuditCommand::Tail {
            conn,
            lines,
            follow,
        } => tail(&conn, lines, follow).await?,
        AuditCommand::Export {
            conn,
            offline,
            after,
        } => match OfflineCopy::open(offline).await? {
            None => {
                let request = pb::QueryAuditRequest {
                    page_token: token(after),
                    ..Default::default()
                };
                query(&conn, request, 0).await?;
            }
            Some(copy) => copy.export(after)?,
        },
        AuditCommand::Verify {
            conn,
            offline,
            seen,
        } => {
            let seen = parse_head(seen)?;
            return match OfflineCopy::open(offline).await? {
                None => verify_online(&conn, seen).await,
                Some(copy) => copy.verify(seen),
            };
        }
    }
    Ok(Verdict::Ok)
}

/// A page token: the sequence number to continue after ("" for the start).
fn token(after: u64) -> String {
    if after == 0 {
        String::new()
    } else {
        after.to_string()
    }
}

/// One record as a JSON line, its MAC in hex (as `AuditEntry::to_json` writes it).
fn to_json(r: &pb::AuditRecord) -> serde_json::Value {
    let mac: String = r.mac.iter().map(|b| format!("{b:02x}")).collect();
    serde_json::json!({
        "sequence": r.sequence,
        "at_ms": r.at_ms,
        "caller": r.caller,
        "rpc": r.rpc,
        "tenant_id": r.tenant_id,
        "credential_id": r.credential_id,
        "version": r.version,
        "purpose": r.purpose,
        "outcome": r.outcome,
        "mac": mac,
    })
}

fn print(records: &[pb::AuditRecord]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for record in records {
        writeln!(out, "{}", to_json(record))?;
    }
    out.flush()?;
    Ok(())
}

/// Prints the records `request` matches, page by page, at most `limit` (0: all).
async fn query(
    conn: &Connection,
    mut request: pb::QueryAuditRequest,
    limit: u64,
) -> anyhow::Result<()> {
    let mut client = admin(conn).await?;
    let mut shown = 0u64;
    loop {
        let left = if limit == 0 { MAX_PAGE } else { limit - shown };
        request.page_size = left.min(MAX_PAGE) as u32;
        let page = client
            .query_audit(request.clone())
            .await
            .map_err(status_error)?
            .into_inner();
        print(&page.records)?;
        shown += page.records.len() as u64;
        if page.next_page_token.is_empty() || (limit != 0 && shown >= limit) {
            return Ok(());
        }
        request.page_token = page.next_page_token;
    }
}

// ---------------------------------------------------------------------------------------------
// tail

/// An Admin client that knows how many of its own `QueryAudit` calls have left
/// a record it has not yet passed over.
struct Tailer {
    client: AdminClient<tonic::transport::Channel>,
    /// Records of this command's earlier calls not yet seen.
    own_unseen: u64,
}

impl Tailer {
    /// Up to `page_size` records after `after`, in one call.
    async fn page(&mut self, after: u64, page_size: u64) -> anyhow::Result<pb::QueryAuditResponse> {
        let request = pb::QueryAuditRequest {
            page_token: token(after),
            page_size: page_size.min(MAX_PAGE) as u32,
            ..Default::default()
        };
        let page = self
            .client
            .query_audit(request)
            .await
            .map_err(status_error)?
            .into_inner();
        // Its record is written before the answer comes back: the next call sees it.
        self.own_unseen += 1;
        Ok(page)
    }

    /// The first record after `after` and whether more follow (`None`: none after it).
    async fn probe(&mut self, after: u64) -> anyhow::Result<Option<(u64, bool)>> {
        let page = self.page(after, 1).await?;
        Ok(page
            .records
            .first()
            .map(|r| (r.sequence, !page.next_page_token.is_empty())))
    }

    /// Every record after `after`, to the end of the log.
    async fn rest(&mut self, mut after: u64) -> anyhow::Result<Vec<pb::AuditRecord>> {
        let mut records = Vec::new();
        loop {
            let page = self.page(after, MAX_PAGE).await?;
            if let Some(last) = page.records.last() {
                after = last.sequence;
            }
            let more = !page.next_page_token.is_empty() && !page.records.is_empty();
            records.extend(page.records);
            if !more {
                return Ok(records);
            }
        }
    }

    /// About the last sequence number of the log (0: empty), in a few calls:
    /// galloping from the start, then bisecting. Sequence numbers have no gaps
    /// after the oldest kept record.
    async fn end(&mut self, hint: u64) -> anyhow::Result<u64> {
        let Some((mut lo, more)) = self.probe(0).await? else {
            return Ok(0);
        };
        if !more {
            return Ok(lo);
        }
        // Invariant: record `lo` exists; none after `hi` did when asked.
        let mut step = hint.max(1);
        let mut hi = loop {
            let at = lo.saturating_add(step);
            match self.probe(at).await? {
                None => break at,
                Some((seq, false)) => return Ok(seq),
                Some((seq, true)) => lo = seq,
            }
            step = step.saturating_mul(2);
        };
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match self.probe(mid).await? {
                None => hi = mid,
                Some((seq, false)) => return Ok(seq),
                Some((seq, true)) => {
                    lo = seq;
                    hi = hi.max(seq + 1);
                }
            }
        }
        Ok(lo)
    }

    /// Drops the records of this command's own calls from `records` (oldest
    /// first), newest first, as many as it has made and not yet seen. They are
    /// the Admin `QueryAudit` records with no tenant, credential or purpose that
    /// succeeded; another caller's identical-looking call may be dropped in
    /// their place, never more of them.
    fn drop_own(&mut self, records: &mut Vec<pb::AuditRecord>) {
        let own = |r: &pb::AuditRecord| {
            r.rpc == "QueryAudit"
                && r.outcome == "ok"
                && r.tenant_id.is_empty()
                && r.credential_id.is_empty()
                && r.purpose.is_empty()
                && r.version == 0
        };
        // The call that returned `records` is not among them.
        let mut budget = self.own_unseen.saturating_sub(1);
        let mut i = records.len();
        while i > 0 && budget > 0 {
            i -= 1;
            if own(&records[i]) {
                records.remove(i);
                budget -= 1;
                self.own_unseen -= 1;
            }
        }
    }
}

async fn tail(conn: &Connection, lines: u64, follow: bool) -> anyhow::Result<()> {
    let mut tailer = Tailer {
        client: admin(conn).await?,
        own_unseen: 0,
    };
    let end = tailer.end(lines).await?;
    // Far enough back that the probes' own records cannot push the wanted ones out.
    let start = end.saturating_sub(lines.saturating_add(tailer.own_unseen));
    let mut records = tailer.rest(start).await?;
    let mut cursor = records.last().map_or(start, |r| r.sequence);
    tailer.drop_own(&mut records);
    let keep = records.len().saturating_sub(lines as usize);
    print(&records[keep..])?;
    if !follow {
        return Ok(());
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            () = tokio::time::sleep(FOLLOW_INTERVAL) => {}
        }
        let mut records = tailer.rest(cursor).await?;
        if let Some(last) = records.last() {
            cursor = last.sequence;
        }
        tailer.drop_own(&mut records);
        print(&records)?;
    }
}

// ---------------------------------------------------------------------------------------------
// verify

async fn verify_online(conn: &Connection, seen: Option<Head>) -> anyhow::Result<Verdict> {
    let request = pb::VerifyAuditRequest {
        seen: seen.map(Into::into),
    };
    let verification = admin(conn)
        .await?
        .verify_audit(request)
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(report(&verification, seen))
}

/// A stopped server's store, copied into a scratch directory and opened there:
/// opening a store in place writes to it (sled's recovery, the replay of its
/// log, the audit journal's records), and a store kept as evidence must stay
/// as it was. Removed on drop.
struct OfflineCopy {
    // Declared first, so dropped first: the store closes before its files go.
    vault: credvault::vault::Vault,
    _scratch: tempfile::TempDir,
}

impl OfflineCopy {
    /// Copies and opens the store `offline` names; `None` without `--data-dir`.
    async fn open(offline: Offline) -> anyhow::Result<Option<Self>> {
        use credvault::store::{CopyError, SledStore};

        let Some(dir) = offline.data_dir else {
            return Ok(None);
        };
        let root = load_root(offline.root_key_file, offline.root_key_env)?;
        let parent = offline.scratch.unwrap_or_else(std::env::temp_dir);
        let scratch = tempfile::Builder::new()
            .prefix("credvault-copy-")
            .tempdir_in(&parent)
            .with_context(|| format!("creating a scratch directory in {}", parent.display()))?;
        let copy = scratch.path().join("store");
        let copied = SledStore::copy_stopped(&dir, &copy).map_err(|error| match error {
            // Opening creates a missing directory: a typo must not read an empty store.
            CopyError::NoStore(_) => anyhow::anyhow!(
                "{} holds no credvault store (it should be the server's data_dir)",
                dir.display()
            ),
            CopyError::InUse(_) => anyhow::anyhow!(
                "cannot read the store at {}: is the server still running? The server \
                 locks its data directory; stop it first (or leave out --data-dir to ask \
                 the server)",
                dir.display()
            ),
            other => anyhow::Error::new(other).context(format!(
                "copying the store at {} into {} (--scratch chooses where)",
                dir.display(),
                parent.display()
            )),
        })?;
        // stderr: an export's stdout holds JSON lines only.
        eprintln!(
            "reading a copy ({:.1} MiB in {}); {} is not written",
            copied as f64 / f64::from(1 << 20),
            parent.display(),
            dir.display()
        );
        let vault = open_vault(copy, root)
            .await
            .with_context(|| format!("opening the copy of {}", dir.display()))?;
        Ok(Some(Self {
            vault,
            _scratch: scratch,
        }))
    }

    /// Verifies the copy's audit chain (and that it still holds `seen`).
    fn verify(&self, seen: Option<Head>) -> anyhow::Result<Verdict> {
        verify_vault(&self.vault, seen)
    }

    /// Prints every record after `after`, as the online export does.
    fn export(&self, mut after: u64) -> anyhow::Result<()> {
        let log = audit_log(&self.vault)?;
        loop {
            let entries = log.export(after, MAX_PAGE as usize)?;
            let Some(last) = entries.last() else {
                return Ok(());
            };
            after = last.sequence;
            let records: Vec<_> = entries.into_iter().map(pb::AuditRecord::from).collect();
            print(&records)?;
        }
    }
}

/// Opens the vault over the store in `dir` with `root`, writing to it as every
/// opening does.
async fn open_vault(
    dir: PathBuf,
    root: credvault::crypto::SymmetricKey,
) -> anyhow::Result<credvault::vault::Vault> {
    use credvault::store::{SledStore, StoreOptions};

    let store = SledStore::open(&StoreOptions::new(&dir))
        .with_context(|| format!("cannot open the store at {}", dir.display()))?;
    credvault::vault::Vault::open(
        Arc::new(store),
        root,
        Arc::new(credvault::clock::SystemClock),
        credvault::vault::VaultOptions::default(),
    )
    .await
    .with_context(|| format!("opening the vault in {}", dir.display()))
}

/// Opens the store in `dir` with `root` (writing to it, as every opening
/// does) and verifies its audit chain, printing the verdict: `restore`'s check
/// of the directory it has just made.
pub(super) async fn verify_in_place(
    dir: PathBuf,
    root: credvault::crypto::SymmetricKey,
) -> anyhow::Result<Verdict> {
    let vault = open_vault(dir.clone(), root).await?;
    verify_vault(&vault, None)
        .with_context(|| format!("reading the audit log in {}", dir.display()))
}

fn audit_log(vault: &credvault::vault::Vault) -> anyhow::Result<&credvault::audit::AuditLog> {
    vault
        .audit_log()
        .context("the vault was opened without its audit log")
}

/// Verifies `vault`'s audit chain (and that it still holds `seen`), printing
/// the verdict.
fn verify_vault(vault: &credvault::vault::Vault, seen: Option<Head>) -> anyhow::Result<Verdict> {
    let verification = audit_log(vault)?.verify_against(seen)?;
    Ok(report(&verification.into(), seen))
}

/// Prints what `verify` found, online or offline, and the head to keep.
fn report(v: &pb::VerifyAuditResponse, seen: Option<Head>) -> Verdict {
    if !v.ok {
        println!("audit chain BROKEN at sequence {}", v.first_bad_sequence);
        println!("reason: {}", v.reason);
        println!(
            "{} records verified before it (from sequence {})",
            v.records, v.first_sequence
        );
        return Verdict::Broken;
    }
    println!(
        "audit chain ok: {} records (sequence {} to {})",
        v.records, v.first_sequence, v.last_sequence
    );
    if let Some(seen) = seen {
        let check = match pb::HeadCheck::try_from(v.head_check) {
            Ok(pb::HeadCheck::Matched) => "matched",
            Ok(pb::HeadCheck::Pruned) => "pruned since (the log reaches past it)",
            _ => "not checked (an older server?)",
        };
        println!("head seen {}: {check}", seen.sequence);
    }
    if let Some(head) = v.head.as_ref().and_then(|h| Head::try_from(h).ok()) {
        println!("head: {head} (keep it; verify --seen it later to detect truncation)");
    }
    Verdict::Ok
}

// ---------------------------------------------------------------------------------------------
// times

/// `--from`/`--to`: ms since the Unix epoch, or an RFC 3339 date-time
/// (`2026-01-31T12:00:00Z`, `2026-01-31T13:00:00.250+01:00`).
fn parse_time(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| format!("{text:?} is too large for ms since the epoch"));
    }
    rfc3339_ms(text).ok_or_else(|| {
        format!(
            "{text:?} is not a time: expected RFC 3339 (such as 2026-01-31T12:00:00Z) or \
             milliseconds since the Unix epoch"
        )
    })
}

/// An RFC 3339 date-time as ms since the Unix epoch (`None`: malformed or
/// before 1970).
fn rfc3339_ms(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let mut i = 19;
    let mut ms = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        // Milliseconds: the first three digits, padded.
        for k in 0..3 {
            ms = ms * 10
                + b.get(start + k)
                    .filter(|_| start + k < i)
                    .map_or(0, |d| i64::from(d - b'0'));
        }
    }
    let offset_minutes = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (h, m) = (digits(i + 1..i + 3)?, digits(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            if *sign == b'+' {
                h * 60 + m
            } else {
                -(h * 60 + m)
            }
        }
        _ => return None,
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&month)
        || day < 1
        || day > month_days[(month - 1) as usize]
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    u64::try_from(seconds * 1000 + ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_milliseconds() {
        assert_eq!(parse_time("0"), Ok(0));
        assert_eq!(parse_time("1767225600000"), Ok(1_767_225_600_000));
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_time("2026-01-01T00:00:00Z"), Ok(1_767_225_600_000));
        assert_eq!(parse_time("2026-01-01t00:00:00z"), Ok(1_767_225_600_000));
        assert_eq!(
            parse_time("2026-01-01 01:00:00+01:00"),
            Ok(1_767_225_600_000)
        );
        assert_eq!(
            parse_time("2025-12-31T23:30:00-00:30"),
            Ok(1_767_225_600_000)
        );
        assert_eq!(parse_time("2026-01-01T00:00:00.25Z"), Ok(1_767_225_600_250));
        assert_eq!(
            parse_time("2026-01-01T00:00:00.123456Z"),
            Ok(1_767_225_600_123)
        );
        // 2000-02-29 (a leap day) + 1d 1h 1m 1s.
        assert_eq!(
            parse_time("2000-03-01T01:01:01Z"),
            Ok(951_782_400_000 + 90_061_000)
        );
        for bad in [
            "",
            "yesterday",
            "2026-01-01",
            "2026-01-01T00:00:00",
            "2026-02-30T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T00:00:00.Z",
            "2026-01-01T00:00:00+0100",
            "2026-01-01T00:00:00Zjunk",
            "1969-12-31T23:59:59Z",
            "-5",
            "99999999999999999999999",
        ] {
            let err = parse_time(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad:?}");
        }
    }
}
