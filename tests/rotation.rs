//! Key rotation over gRPC, end to end: a real server on 127.0.0.1 over mutual
//! TLS 1.3 with certificates made in the test and a sled store in a temp dir.
//!
//! - Rotating the KEK, a tenant's DEK (with re-encryption) and the root key
//!   while 32 clients seal and unseal fails no call and loses no secret.
//! - A KEK rewrap and a tenant re-encryption killed with SIGKILL mid-job (the
//!   real binary) resume after a restart, and the ledger counts nothing twice.
//! - `DestroyKeyVersion` refuses what is in use or primary, then destroys.
//! - `RotateRootKey` refuses bad key files; after it, only the new root key
//!   opens the store.
//!
//! Waiting is polling with a hang guard, never a sleep that an assertion
//! depends on.

mod support;

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credvault::crypto::root;
use credvault::service::pb::admin_client::AdminClient;
use credvault::service::pb::vault_client::VaultClient;
use credvault::service::pb::{self, CredentialKind};
use tonic::Code;
use tonic::transport::Channel;

use support::{
    Acked, Pki, ServerOptions, ServerProcess, TestServer, assert_all_unseal, check_unseal,
    expect_status, seal_all, seal_request, secret_bytes, write_server_files,
};

type Admin = AdminClient<Channel>;
type Client = VaultClient<Channel>;

const KINDS: [CredentialKind; 4] = [
    CredentialKind::CookieJar,
    CredentialKind::ApiKey,
    CredentialKind::OauthToken,
    CredentialKind::Generic,
];

/// How long a job may take to finish, or the load to make progress: a hang
/// guard, not a measurement.
const HANG_GUARD: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(5);

// ---------------------------------------------------------------------------
// Helpers

fn kind_of(n: usize) -> CredentialKind {
    KINDS[n % KINDS.len()]
}

async fn get_job(admin: &mut Admin, id: &str) -> pb::RotationJob {
    admin
        .get_rotation_job(pb::GetRotationJobRequest {
            job_id: id.to_owned(),
        })
        .await
        .unwrap_or_else(|s| panic!("GetRotationJob {id}: {s:?}"))
        .into_inner()
}

/// Polls a job until it is done; it must have done all it had to.
async fn wait_done(admin: &mut Admin, id: &str) -> pb::RotationJob {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let job = get_job(admin, id).await;
        assert_eq!(job.job_id, id);
        // Progress never passes the total (which may grow as records appear).
        assert!(
            job.done <= job.total,
            "more done than there is to do: {job:?}"
        );
        if job.state == "done" {
            assert_eq!(
                job.done, job.total,
                "a finished job did all its work: {job:?}"
            );
            assert!(job.finished_at_ms >= job.created_at_ms, "{job:?}");
            assert!(job.finished_at_ms > 0, "{job:?}");
            return job;
        }
        assert_eq!(job.state, "running", "{job:?}");
        assert!(
            Instant::now() < deadline,
            "job {id} did not finish within {HANG_GUARD:?}: {job:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls a job until it is part-way: at least a quarter of it durable (so its
/// cursor is well inside the key range), some of it still to do.
async fn wait_mid_job(admin: &mut Admin, id: &str) -> pb::RotationJob {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let job = get_job(admin, id).await;
        assert_eq!(
            job.state, "running",
            "the job finished before it could be interrupted (make it bigger or slower): {job:?}"
        );
        if 0 < job.done && job.done >= job.total / 4 && job.done < job.total {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} made no progress within {HANG_GUARD:?}: {job:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// `GetKeyStatus` rows, of one tenant or (`""`) the whole vault.
async fn key_status(admin: &mut Admin, tenant: &str) -> Vec<pb::KeyVersionStatus> {
    admin
        .get_key_status(pb::GetKeyStatusRequest {
            tenant_id: tenant.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("GetKeyStatus {tenant:?}: {s:?}"))
        .into_inner()
        .versions
}

#[track_caller]
/// After a job moved everything from version 1 to 2 of a `layer` key (a KEK
/// rewrap, a tenant's re-encryption): v1 protects nothing, v2 protects each of
/// `count` records, and it encrypted each exactly once (no batch applied twice).
fn assert_all_moved_to_v2(rows: &[pb::KeyVersionStatus], layer: &str, tenant: &str, count: u64) {
    let (old, new) = (row(rows, layer, tenant, 1), row(rows, layer, tenant, 2));
    assert_eq!(
        (old.state.as_str(), old.protected_records),
        ("decrypt-only", 0),
        "{old:?}"
    );
    assert_eq!(
        (new.state.as_str(), new.protected_records),
        ("active", count),
        "the new {layer} protects each record exactly once: {new:?}"
    );
    assert_eq!(
        new.encryptions, count,
        "the new {layer} encrypted each record exactly once: {new:?}"
    );
}

fn row<'a>(
    rows: &'a [pb::KeyVersionStatus],
    layer: &str,
    tenant: &str,
    version: u32,
) -> &'a pb::KeyVersionStatus {
    rows.iter()
        .find(|r| r.layer == layer && r.tenant_id == tenant && r.version == version)
        .unwrap_or_else(|| panic!("no {layer} {tenant:?} v{version} in {rows:#?}"))
}

fn rows_of<'a>(
    rows: &'a [pb::KeyVersionStatus],
    layer: &'a str,
) -> impl Iterator<Item = &'a pb::KeyVersionStatus> {
    rows.iter().filter(move |r| r.layer == layer)
}

#[track_caller]
fn root_version(rows: &[pb::KeyVersionStatus]) -> u32 {
    let roots: Vec<_> = rows_of(rows, "root").collect();
    assert_eq!(roots.len(), 1, "{roots:?}");
    roots[0].version
}

fn destroy_request(layer: &str, tenant: &str, version: u32) -> pb::DestroyKeyVersionRequest {
    pb::DestroyKeyVersionRequest {
        layer: layer.to_owned(),
        tenant_id: tenant.to_owned(),
        version,
    }
}

fn rotate_tenant(tenant: &str, reencrypt: bool) -> pb::RotateTenantKeyRequest {
    pb::RotateTenantKeyRequest {
        tenant_id: tenant.to_owned(),
        reencrypt,
    }
}

fn rotate_root(path: &Path) -> pb::RotateRootKeyRequest {
    pb::RotateRootKeyRequest {
        new_root_key_file: path.display().to_string(),
    }
}

/// Rotates the root key to version 2 from `path`; the job must be done (a
/// root rotation is one batch) and cover every record it counted.
async fn rotate_root_to_v2(admin: &mut Admin, path: &Path) {
    let job = admin
        .rotate_root_key(rotate_root(path))
        .await
        .unwrap_or_else(|s| panic!("RotateRootKey: {s:?}"))
        .into_inner();
    assert_eq!(
        (
            job.job_id.as_str(),
            job.kind.as_str(),
            job.state.as_str(),
            job.target_version
        ),
        ("root-v2", "root-key", "done", 2),
        "{job:?}"
    );
    assert_eq!(job.done, job.total, "{job:?}");
}

/// Waits (hang guard only) until `counter` reaches `target`.
async fn wait_for_count(counter: &AtomicU64, target: u64, what: &str) {
    let deadline = Instant::now() + HANG_GUARD;
    while counter.load(Ordering::Relaxed) < target {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {target} within {HANG_GUARD:?}",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------
// 1. Rotation of every layer under load

const LOAD_TASKS: usize = 32;
const LOAD_CONNECTIONS: usize = 4;
const LOAD_TENANTS: usize = 4;
/// Tenants with one credential each: DEKs for the KEK job to rewrap.
const IDLE_TENANTS: usize = 160;
/// Credentials of the re-encrypted tenant sealed before the load starts.
const REENCRYPTED_SEED: usize = 160;

fn load_tenant(n: usize) -> String {
    format!("load-{n}")
}

/// Shared by the load tasks.
struct Load {
    stop: AtomicBool,
    /// Calls that completed (successfully or not).
    calls: AtomicU64,
    /// Calls that failed, and the first few of them.
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Load {
    fn fail(&self, failure: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut failures = self.failures.lock().unwrap();
        if failures.len() < 20 {
            failures.push(failure);
        }
    }
}

/// Stops the load when the test ends, also by a panic (the clients would
/// otherwise spin on a server that is gone).
struct StopOnDrop(Arc<Load>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// One client: seals new versions of its own credentials, unseals each one it
/// was acknowledged and an earlier one, until told to stop. Returns every
/// acknowledged seal.
async fn load_task(
    task: usize,
    mut sealer: Client,
    mut unsealer: Client,
    load: Arc<Load>,
) -> Vec<Acked> {
    let tenant = load_tenant(task % LOAD_TENANTS);
    let mut acked: Vec<Acked> = Vec::new();
    let mut i = 0usize;
    while !load.stop.load(Ordering::Relaxed) {
        let credential = format!("load/{task:02}/{}", i % 3);
        let secret = secret_bytes(((task as u64) << 32) | i as u64, 16 + (i * 97) % 2048);
        let sealed = sealer
            .seal(seal_request(&tenant, &credential, kind_of(i), &secret))
            .await;
        load.calls.fetch_add(1, Ordering::Relaxed);
        match sealed.map(|r| r.into_inner().metadata) {
            Ok(Some(meta)) => acked.push(Acked {
                tenant: tenant.clone(),
                credential,
                version: meta.version,
                secret,
            }),
            Ok(None) => load.fail(format!("Seal {tenant}/{credential}: no metadata")),
            Err(status) => load.fail(format!("Seal {tenant}/{credential}: {status:?}")),
        }
        let mut check = Vec::new();
        if let Some(last) = acked.last() {
            check.push(last.clone());
        }
        if acked.len() > 1 {
            check.push(acked[(i * 7919) % (acked.len() - 1)].clone());
        }
        for a in &check {
            let result = check_unseal(&mut unsealer, a).await;
            load.calls.fetch_add(1, Ordering::Relaxed);
            if let Err(failure) = result {
                load.fail(failure);
            }
        }
        i += 1;
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_every_layer_under_load_fails_no_call_and_loses_no_secret() {
    let server = TestServer::start_with(
        Pki::new(),
        ServerOptions::default()
            // Every acknowledged version stays readable.
            .limit("max_versions = 0")
            // Many batches per job, so the jobs interleave with the load.
            .rotation("batch_size = 16"),
    )
    .await;
    let (ingest, executor) = (server.pki.role("ingest"), server.pki.role("executor"));
    let mut admin = server.admin(&server.pki.role("admin")).await;
    let mut sealers = Vec::new();
    let mut unsealers = Vec::new();
    for _ in 0..LOAD_CONNECTIONS {
        sealers.push(server.vault(&ingest).await);
        unsealers.push(server.vault(&executor).await);
    }

    // Seed: DEKs for the KEK job, credentials for the re-encryption job.
    let mut seed = Vec::new();
    for t in 0..IDLE_TENANTS {
        seed.push((
            format!("idle-{t:03}"),
            "cred".to_owned(),
            secret_bytes(1_000_000 + t as u64, 40 + t),
        ));
    }
    for n in 0..REENCRYPTED_SEED {
        seed.push((
            load_tenant(0),
            format!("seed/{n:03}"),
            secret_bytes(2_000_000 + n as u64, 100 + 13 * n),
        ));
    }
    for t in 1..LOAD_TENANTS {
        seed.push((
            load_tenant(t),
            "seed".to_owned(),
            secret_bytes(t as u64, 64),
        ));
    }
    let mut acked = seal_all(&sealers[0], seed, 16, kind_of).await;

    // The load.
    let load = Arc::new(Load {
        stop: AtomicBool::new(false),
        calls: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
    });
    let _stop_on_drop = StopOnDrop(load.clone());
    let tasks: Vec<_> = (0..LOAD_TASKS)
        .map(|task| {
            tokio::spawn(load_task(
                task,
                sealers[task % LOAD_CONNECTIONS].clone(),
                unsealers[task % LOAD_CONNECTIONS].clone(),
                load.clone(),
            ))
        })
        .collect();
    wait_for_count(&load.calls, LOAD_TASKS as u64, "load warming up").await;
    let calls_at = |what: &str| {
        let n = load.calls.load(Ordering::Relaxed);
        eprintln!("load calls {what}: {n}");
        n
    };
    let before = calls_at("before the rotations");

    // KEK: a new primary at once, then the rewrap of every DEK.
    let kek = admin
        .rotate_kek(pb::RotateKekRequest {})
        .await
        .unwrap_or_else(|s| panic!("RotateKek: {s:?}"))
        .into_inner();
    assert_eq!(
        (kek.job_id.as_str(), kek.kind.as_str(), kek.target_version),
        ("kek-v2", "kek", 2),
        "{kek:?}"
    );
    let kek = wait_done(&mut admin, &kek.job_id).await;
    assert_eq!(
        kek.total,
        (IDLE_TENANTS + LOAD_TENANTS) as u64,
        "one DEK per tenant to rewrap: {kek:?}"
    );
    calls_at("after the KEK job");

    // A tenant's DEK, re-encrypting its credentials while its clients seal.
    let tenant = load_tenant(0);
    let dek = admin
        .rotate_tenant_key(rotate_tenant(&tenant, true))
        .await
        .unwrap_or_else(|s| panic!("RotateTenantKey: {s:?}"))
        .into_inner();
    assert_eq!(
        (
            dek.job_id.as_str(),
            dek.kind.as_str(),
            dek.tenant_id.as_str(),
            dek.target_version
        ),
        ("dek-load-0-v2", "tenant-key", tenant.as_str(), 2),
        "{dek:?}"
    );
    let dek = wait_done(&mut admin, &dek.job_id).await;
    assert!(
        dek.total > REENCRYPTED_SEED as u64,
        "the seed and the load's versions were re-encrypted: {dek:?}"
    );
    calls_at("after the re-encryption job");

    // The root key.
    let new_root = server.pki.dir().join("root-v2.key");
    root::generate_file(&new_root).expect("new root key");
    rotate_root_to_v2(&mut admin, &new_root).await;
    let after = calls_at("after the root rotation");
    assert!(after > before, "the load ran during the rotations");

    // The load goes on under the new root key, then stops.
    wait_for_count(
        &load.calls,
        after + 2 * LOAD_TASKS as u64,
        "load after the root rotation",
    )
    .await;
    load.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        acked.extend(task.await.expect("load task"));
    }
    assert_eq!(
        load.failed.load(Ordering::Relaxed),
        0,
        "failed calls out of {}, e.g. {:?}",
        load.calls.load(Ordering::Relaxed),
        load.failures.lock().unwrap()
    );

    // The ledger: everything moved off the old versions.
    let rows = key_status(&mut admin, "").await;
    assert_eq!(root_version(&rows), 2);
    assert_eq!(row(&rows, "kek", "", 1).protected_records, 0, "{rows:#?}");
    assert_eq!(row(&rows, "kek", "", 2).state, "active");
    assert_eq!(
        row(&rows, "kek", "", 2).protected_records,
        rows_of(&rows, "dek").count() as u64,
        "the new KEK wraps every DEK"
    );
    assert!(
        rows_of(&rows, "dek").all(|d| d.kek_version == 2),
        "{rows:#?}"
    );
    // Nothing pruned or revoked: the DEKs protect exactly the acknowledged
    // versions, each once, and the re-encrypted tenant's are all on its new DEK.
    let protected: u64 = rows_of(&rows, "dek").map(|d| d.protected_records).sum();
    assert_eq!(protected, acked.len() as u64, "{rows:#?}");
    assert_eq!(
        row(&rows, "dek", &tenant, 2).protected_records,
        acked.iter().filter(|a| a.tenant == tenant).count() as u64,
        "{rows:#?}"
    );
    let old_dek = row(&rows, "dek", &tenant, 1);
    assert_eq!(
        (old_dek.state.as_str(), old_dek.protected_records),
        ("decrypt-only", 0),
        "{old_dek:?}"
    );

    // Every acknowledged secret, by version, to its exact bytes.
    eprintln!("acknowledged seals to check: {}", acked.len());
    assert_all_unseal(&unsealers[0], &acked).await;
}

// ---------------------------------------------------------------------------
// 2. SIGKILL mid-job: the job resumes, nothing is done or counted twice

/// A rotation config whose jobs take many small, paced batches.
fn slow_jobs() -> ServerOptions {
    ServerOptions::default()
        .rotation(format!("batch_size = {SLOW_BATCH}"))
        .rotation("batch_pause_ms = 50")
}

const SLOW_BATCH: u64 = 5;

/// Starts the binary on the files of `pki` (written with `options`).
async fn start_binary(pki: &Pki, options: &ServerOptions) -> (ServerProcess, std::path::PathBuf) {
    let placeholder = "127.0.0.1:0".parse().expect("address");
    let (_, config_file) = write_server_files(pki, options, placeholder);
    let process = ServerProcess::start(pki, &config_file, &[]).await;
    (process, config_file)
}

/// SIGKILLs `process` once `job` is part-way, restarts the binary on the same
/// config and data, and checks the job picked up where it was.
async fn kill_mid_job_and_restart(
    pki: &Pki,
    config_file: &Path,
    process: &mut ServerProcess,
    job: &str,
) -> ServerProcess {
    let mut admin = process.admin(pki, &pki.role("admin")).await;
    let mid = wait_mid_job(&mut admin, job).await;
    let status = process.kill();
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status}");
    eprintln!("killed at {}/{} of {job}", mid.done, mid.total);

    let restarted = ServerProcess::start(pki, config_file, &[]).await;
    let mut admin = restarted.admin(pki, &pki.role("admin")).await;
    let resumed = get_job(&mut admin, job).await;
    // A read can see a batch that is committed but not yet flushed (group
    // commit), and a job has one batch in flight at a time: the kill may lose
    // that batch (all of it, records and progress alike), never more.
    assert!(
        resumed.done + SLOW_BATCH >= mid.done,
        "durable progress was lost: {mid:?} before the kill, {resumed:?} after"
    );
    restarted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kek_rewrap_killed_mid_job_resumes_and_counts_every_dek_once() {
    const TENANTS: usize = 300;
    let pki = Pki::new();
    let (mut process, config_file) = start_binary(&pki, &slow_jobs()).await;
    let ingest = process.vault(&pki, &pki.role("ingest")).await;
    let seed = (0..TENANTS)
        .map(|t| {
            (
                format!("tenant-{t:03}"),
                format!("cred/{t}"),
                secret_bytes(t as u64 + 1, 32 + 7 * t),
            )
        })
        .collect();
    let acked = seal_all(&ingest, seed, 16, kind_of).await;

    let mut admin = process.admin(&pki, &pki.role("admin")).await;
    let job = admin
        .rotate_kek(pb::RotateKekRequest {})
        .await
        .unwrap_or_else(|s| panic!("RotateKek: {s:?}"))
        .into_inner();
    assert_eq!(
        (job.job_id.as_str(), job.state.as_str(), job.target_version),
        ("kek-v2", "running", 2),
        "{job:?}"
    );
    let process = kill_mid_job_and_restart(&pki, &config_file, &mut process, "kek-v2").await;

    let mut admin = process.admin(&pki, &pki.role("admin")).await;
    let job = wait_done(&mut admin, "kek-v2").await;
    assert_eq!(job.total, TENANTS as u64, "{job:?}");

    let rows = key_status(&mut admin, "").await;
    assert_all_moved_to_v2(&rows, "kek", "", TENANTS as u64);
    let deks: Vec<_> = rows_of(&rows, "dek").collect();
    assert_eq!(deks.len(), TENANTS);
    assert!(
        deks.iter().all(|d| d.kek_version == 2 && d.version == 1),
        "every DEK is wrapped by the new KEK: {deks:?}"
    );

    let executor = process.vault(&pki, &pki.role("executor")).await;
    assert_all_unseal(&executor, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_reencryption_killed_mid_job_resumes_and_moves_every_version_once() {
    const CREDENTIALS: usize = 400;
    const TENANT: &str = "big";
    const BYSTANDER: &str = "bystander";
    let pki = Pki::new();
    let (mut process, config_file) = start_binary(&pki, &slow_jobs()).await;
    let ingest = process.vault(&pki, &pki.role("ingest")).await;
    let mut seed: Vec<_> = (0..CREDENTIALS)
        .map(|n| {
            (
                TENANT.to_owned(),
                format!("cred/{n:03}"),
                secret_bytes(n as u64 + 7, 24 + 11 * n),
            )
        })
        .collect();
    seed.extend((0..5).map(|n| {
        (
            BYSTANDER.to_owned(),
            format!("cred/{n}"),
            secret_bytes(n as u64 + 9000, 50),
        )
    }));
    let acked = seal_all(&ingest, seed, 16, kind_of).await;

    let mut admin = process.admin(&pki, &pki.role("admin")).await;
    let job = admin
        .rotate_tenant_key(rotate_tenant(TENANT, true))
        .await
        .unwrap_or_else(|s| panic!("RotateTenantKey: {s:?}"))
        .into_inner();
    assert_eq!(
        (
            job.job_id.as_str(),
            job.kind.as_str(),
            job.state.as_str(),
            job.tenant_id.as_str()
        ),
        ("dek-big-v2", "tenant-key", "running", TENANT),
        "{job:?}"
    );
    let process = kill_mid_job_and_restart(&pki, &config_file, &mut process, "dek-big-v2").await;

    let mut admin = process.admin(&pki, &pki.role("admin")).await;
    let job = wait_done(&mut admin, "dek-big-v2").await;
    assert_eq!(job.total, CREDENTIALS as u64, "{job:?}");

    let rows = key_status(&mut admin, TENANT).await;
    assert_all_moved_to_v2(&rows, "dek", TENANT, CREDENTIALS as u64);
    // The other tenant's key was not touched.
    let rows = key_status(&mut admin, BYSTANDER).await;
    let deks: Vec<_> = rows_of(&rows, "dek").collect();
    assert_eq!(deks.len(), 1, "{deks:?}");
    assert_eq!(
        (
            deks[0].version,
            deks[0].state.as_str(),
            deks[0].protected_records
        ),
        (1, "active", 5)
    );

    let executor = process.vault(&pki, &pki.role("executor")).await;
    assert_all_unseal(&executor, &acked).await;
}

// ---------------------------------------------------------------------------
// 3. DestroyKeyVersion

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_is_refused_while_a_version_is_in_use_or_primary_then_destroys() {
    const TENANTS: usize = 10;
    const PER_TENANT: usize = 3;
    // One DEK per batch with a long pause: right after RotateKek, the old KEK
    // still wraps (nearly) every DEK. The restart below removes the pause.
    let mut server = TestServer::start_with(
        Pki::new(),
        ServerOptions::default()
            .rotation("batch_size = 1")
            .rotation("batch_pause_ms = 2000"),
    )
    .await;
    let settings = server.vault(&server.pki.role("settings")).await;
    let mut admin = server.admin(&server.pki.role("admin")).await;
    let seed = (0..TENANTS * PER_TENANT)
        .map(|n| {
            (
                format!("t-{}", n % TENANTS),
                format!("cred/{n}"),
                secret_bytes(n as u64 + 31, 77),
            )
        })
        .collect();
    let acked = seal_all(&settings, seed, 8, kind_of).await;

    // Not an admin: refused before anything else is looked at.
    let mut executor_admin = server.admin(&server.pki.role("executor")).await;
    expect_status(
        executor_admin
            .destroy_key_version(destroy_request("kek", "", 1))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );

    // The primary KEK.
    expect_status(
        admin
            .destroy_key_version(destroy_request("kek", "", 1))
            .await,
        Code::FailedPrecondition,
        "KEY_IS_PRIMARY",
    );

    // A DEK that still protects versions (rotated without re-encryption), and
    // the new primary DEK.
    let job = admin
        .rotate_tenant_key(rotate_tenant("t-0", false))
        .await
        .unwrap_or_else(|s| panic!("RotateTenantKey: {s:?}"))
        .into_inner();
    assert_eq!(
        (job.state.as_str(), job.target_version, job.done, job.total),
        ("done", 2, 0, 0),
        "no re-encryption, nothing to do: {job:?}"
    );
    let status = expect_status(
        admin
            .destroy_key_version(destroy_request("dek", "t-0", 1))
            .await,
        Code::FailedPrecondition,
        "KEY_IN_USE",
    );
    assert!(
        status
            .message()
            .contains(&format!("protects {PER_TENANT} ")),
        "the count is in the message: {status:?}"
    );
    expect_status(
        admin
            .destroy_key_version(destroy_request("dek", "t-0", 2))
            .await,
        Code::FailedPrecondition,
        "KEY_IS_PRIMARY",
    );

    // The old KEK while its rewrap has barely started.
    let job = admin
        .rotate_kek(pb::RotateKekRequest {})
        .await
        .unwrap_or_else(|s| panic!("RotateKek: {s:?}"))
        .into_inner();
    assert_eq!(job.job_id, "kek-v2");
    let mut refused_with_count = None;
    for _ in 0..5 {
        let before = row(&key_status(&mut admin, "").await, "kek", "", 1).protected_records;
        let result = admin
            .destroy_key_version(destroy_request("kek", "", 1))
            .await;
        let after = row(&key_status(&mut admin, "").await, "kek", "", 1).protected_records;
        let status = expect_status(result, Code::FailedPrecondition, "KEY_IN_USE");
        assert!(after > 0, "the slow job cannot have finished yet");
        if before == after {
            refused_with_count = Some((status, after));
            break;
        }
        // A batch committed in between: ask again.
    }
    let (status, count) = refused_with_count.expect("the KEK's count kept changing");
    assert!(
        status.message().contains(&format!("protects {count} ")),
        "the count ({count}) is in the message: {status:?}"
    );
    expect_status(
        admin
            .destroy_key_version(destroy_request("kek", "", 2))
            .await,
        Code::FailedPrecondition,
        "KEY_IS_PRIMARY",
    );

    // Restarted without the pause, the job resumes and finishes; then the old
    // KEK protects nothing and can go.
    server
        .restart_with(|config| {
            config
                .get_mut("rotation")
                .and_then(toml::Value::as_table_mut)
                .expect("[rotation]")
                .insert("batch_pause_ms".into(), toml::Value::Integer(0));
        })
        .await;
    let mut admin = server.admin(&server.pki.role("admin")).await;
    let job = wait_done(&mut admin, "kek-v2").await;
    // One DEK per tenant, and t-0's second one.
    assert_eq!(job.total, TENANTS as u64 + 1, "{job:?}");
    assert_eq!(
        row(&key_status(&mut admin, "").await, "kek", "", 1).protected_records,
        0
    );
    admin
        .destroy_key_version(destroy_request("kek", "", 1))
        .await
        .unwrap_or_else(|s| panic!("destroy KEK v1 after the rewrap: {s:?}"));
    let rows = key_status(&mut admin, "").await;
    let old = row(&rows, "kek", "", 1);
    assert_eq!(old.state, "destroyed", "{old:?}");
    assert!(
        old.destroyed_at_ms >= old.retired_at_ms && old.retired_at_ms > 0,
        "{old:?}"
    );
    assert_eq!(row(&rows, "kek", "", 2).state, "active");
    // Again: a no-op.
    admin
        .destroy_key_version(destroy_request("kek", "", 1))
        .await
        .unwrap_or_else(|s| panic!("destroying a destroyed KEK again: {s:?}"));

    // Re-encrypting t-0 frees its old DEKs.
    let job = admin
        .rotate_tenant_key(rotate_tenant("t-0", true))
        .await
        .unwrap_or_else(|s| panic!("RotateTenantKey: {s:?}"))
        .into_inner();
    assert_eq!(job.job_id, "dek-t-0-v3");
    let job = wait_done(&mut admin, "dek-t-0-v3").await;
    assert_eq!(job.total, PER_TENANT as u64, "{job:?}");
    for version in [1, 2] {
        admin
            .destroy_key_version(destroy_request("dek", "t-0", version))
            .await
            .unwrap_or_else(|s| panic!("destroy t-0 DEK v{version}: {s:?}"));
    }
    let rows = key_status(&mut admin, "t-0").await;
    for version in [1, 2] {
        assert_eq!(row(&rows, "dek", "t-0", version).state, "destroyed");
    }
    let current = row(&rows, "dek", "t-0", 3);
    assert_eq!(
        (
            current.state.as_str(),
            current.protected_records,
            current.kek_version
        ),
        ("active", PER_TENANT as u64, 2)
    );

    // Nothing that was sealed depended on what was destroyed.
    let executor = server.vault(&server.pki.role("executor")).await;
    assert_all_unseal(&executor, &acked).await;
}

// ---------------------------------------------------------------------------
// 4. RotateRootKey

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_refuses_bad_key_files_and_afterwards_only_the_new_key_opens_the_store() {
    let mut server = TestServer::start().await;
    let settings = server.vault(&server.pki.role("settings")).await;
    let mut admin = server.admin(&server.pki.role("admin")).await;
    let seed = (0..40)
        .map(|n| {
            (
                format!("tenant-{}", n % 4),
                format!("cred/{n}"),
                secret_bytes(n as u64 + 500, 300),
            )
        })
        .collect();
    let mut acked = seal_all(&settings, seed, 8, kind_of).await;
    let dir = server.pki.dir().to_owned();
    let old_root = server
        .config
        .root_key_file
        .clone()
        .expect("the test server has a root key file");

    // Not an admin.
    let mut executor_admin = server.admin(&server.pki.role("executor")).await;
    let new_root = dir.join("root-v2.key");
    root::generate_file(&new_root).expect("new root key");
    expect_status(
        executor_admin.rotate_root_key(rotate_root(&new_root)).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );

    // A file that is not there, and one its group can read: refused, nothing changes.
    let group_readable = dir.join("group-readable.key");
    root::generate_file(&group_readable).expect("root key");
    std::fs::set_permissions(&group_readable, std::fs::Permissions::from_mode(0o640))
        .expect("chmod 640");
    for bad in [dir.join("no-such.key"), group_readable] {
        expect_status(
            admin.rotate_root_key(rotate_root(&bad)).await,
            Code::InvalidArgument,
            "ROOT_KEY_UNAVAILABLE",
        );
        assert_eq!(root_version(&key_status(&mut admin, "").await), 1);
    }

    // The key in use, by its own file and by a copy.
    let copy = dir.join("copy-of-root.key");
    std::fs::copy(&old_root, &copy).expect("copy the root key");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    for same in [old_root.clone(), copy] {
        expect_status(
            admin.rotate_root_key(rotate_root(&same)).await,
            Code::FailedPrecondition,
            "SAME_ROOT_KEY",
        );
        assert_eq!(root_version(&key_status(&mut admin, "").await), 1);
    }

    // A good rotation.
    rotate_root_to_v2(&mut admin, &new_root).await;
    let job = get_job(&mut admin, "root-v2").await;
    assert_eq!((job.state.as_str(), job.done), ("done", job.total));
    let rows = key_status(&mut admin, "").await;
    assert_eq!(root_version(&rows), 2);
    let live_keks = rows_of(&rows, "kek")
        .filter(|k| k.state != "destroyed")
        .count();
    assert_eq!(
        row(&rows, "root", "", 2).protected_records,
        live_keks as u64,
        "the new root key wraps every KEK"
    );
    // The running server carries on: seals and unseals work.
    let mut settings = settings;
    let meta = settings
        .seal(seal_request(
            "tenant-new",
            "after-root-rotation",
            CredentialKind::ApiKey,
            b"sk-after",
        ))
        .await
        .unwrap_or_else(|s| panic!("Seal after the root rotation: {s:?}"))
        .into_inner()
        .metadata
        .expect("metadata");
    acked.push(Acked {
        tenant: "tenant-new".into(),
        credential: "after-root-rotation".into(),
        version: meta.version,
        secret: b"sk-after".to_vec(),
    });
    let executor = server.vault(&server.pki.role("executor")).await;
    assert_all_unseal(&executor, &acked).await;
    drop((settings, executor, executor_admin, admin));
    server
        .stop()
        .await
        .unwrap_or_else(|e| panic!("stop: {e:#}"));

    // The binary with the retired root key refuses to start, and says why.
    let root_flag = |path: &Path| {
        [
            OsStr::new("--root-key-file").to_owned(),
            path.as_os_str().to_owned(),
        ]
    };
    let args = root_flag(&old_root);
    let (status, stderr) = ServerProcess::run_to_exit(
        &server.config_file,
        &args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>(),
    )
    .await;
    assert!(
        !status.success(),
        "started with the retired root key: {status}\n{stderr}"
    );
    assert!(status.code().is_some(), "exited, not killed: {status}");
    assert!(
        stderr.contains("retired root key"),
        "stderr names the retired root key: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // With the new one, everything is there.
    let args = root_flag(&new_root);
    let process = ServerProcess::start(
        &server.pki,
        &server.config_file,
        &args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>(),
    )
    .await;
    let mut admin = process.admin(&server.pki, &server.pki.role("admin")).await;
    assert_eq!(root_version(&key_status(&mut admin, "").await), 2);
    let executor = process
        .vault(&server.pki, &server.pki.role("executor"))
        .await;
    assert_all_unseal(&executor, &acked).await;
}

// ---------------------------------------------------------------------------
// The rotation command over every tenant

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_tenant_all_rotates_every_live_tenant_and_skips_deleted_ones() {
    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    let settings = server.vault(&server.pki.role("settings")).await;
    let items: Vec<_> = ["all-a", "all-b", "all-c"]
        .iter()
        .flat_map(|t| {
            (0..3).map(move |c| (t.to_string(), format!("cred/{c}"), secret_bytes(c, 64)))
        })
        .collect();
    let acked = seal_all(&settings, items, 4, kind_of).await;
    settings
        .clone()
        .delete_tenant(pb::DeleteTenantRequest {
            tenant_id: "all-c".into(),
            grace_seconds: Some(3600),
        })
        .await
        .unwrap();

    let admin_cert = server.pki.role("admin");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args([
            "rotate",
            "tenant",
            "--all",
            "--reencrypt",
            "--wait",
            "--server",
        ])
        .arg(server.target())
        .arg("--ca")
        .arg(&server.pki.ca_cert)
        .arg("--cert")
        .arg(&admin_cert.cert)
        .arg("--key")
        .arg(&admin_cert.key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("job dek-all-a-v2 done: 3/3"), "{stdout}");
    assert!(stdout.contains("job dek-all-b-v2 done: 3/3"), "{stdout}");
    assert!(
        stdout.contains("tenant all-c: deleted, skipped"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rotated 2 tenant(s), skipped 1 deleted"),
        "{stdout}"
    );

    let mut admin = server.admin(&admin_cert).await;
    for tenant in ["all-a", "all-b"] {
        let rows = key_status(&mut admin, tenant).await;
        let v1 = row(&rows, "dek", tenant, 1);
        let v2 = row(&rows, "dek", tenant, 2);
        assert_eq!(
            (v1.protected_records, v2.protected_records),
            (0, 3),
            "{tenant}"
        );
    }
    let rows = key_status(&mut admin, "all-c").await;
    assert_eq!(
        rows_of(&rows, "dek").count(),
        1,
        "the deleted tenant kept its one DEK"
    );
    let live: Vec<_> = acked.into_iter().filter(|a| a.tenant != "all-c").collect();
    assert_all_unseal(&server.vault(&server.pki.role("executor")).await, &live).await;
}
