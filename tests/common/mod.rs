//! Shared helpers for the integration tests: a real `SledStore` in a temp dir,
//! a real `Vault` over it, and a way to drop and reopen both (as a restart would).
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use credvault::clock::ManualClock;
use credvault::crypto::SymmetricKey;
use credvault::store::{Rows, SledStore, Store, StoreOptions};
use credvault::vault::{Kind, SealRequest, Secret, Vault, VaultOptions};

/// The start time of every test clock (2026-01-01T00:00:00Z).
pub const T0: u64 = 1_767_225_600_000;

/// A vault over a sled store in its own temp dir, reopenable.
pub struct TestVault {
    /// `None` only while reopening.
    pub vault: Option<Vault>,
    /// `None` only while reopening.
    pub store: Option<Arc<SledStore>>,
    pub clock: Arc<ManualClock>,
    pub root: [u8; 32],
    pub options: VaultOptions,
    pub path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl TestVault {
    /// A new vault in a fresh temp dir, with a random root key.
    pub async fn new(options: VaultOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = *SymmetricKey::generate().expose_bytes();
        let clock = Arc::new(ManualClock::new(T0));
        let path = dir.path().to_owned();
        let store = open_store(&path);
        let vault = open_vault(&store, &root, &clock, options.clone())
            .await
            .unwrap_or_else(|e| panic!("open vault: {e}"));
        Self {
            vault: Some(vault),
            store: Some(store),
            clock,
            root,
            options,
            path,
            _dir: Some(dir),
        }
    }

    pub fn vault(&self) -> &Vault {
        self.vault.as_ref().expect("vault is open")
    }

    pub fn store(&self) -> &Arc<SledStore> {
        self.store.as_ref().expect("store is open")
    }

    /// Drops the vault (and its in-memory key cache) and the store, then opens both again.
    pub async fn reopen(&mut self) {
        self.close();
        let store = open_store(&self.path);
        self.vault = Some(
            open_vault(&store, &self.root, &self.clock, self.options.clone())
                .await
                .unwrap_or_else(|e| panic!("reopen vault: {e}")),
        );
        self.store = Some(store);
    }

    /// Closes the vault and the store, keeping the directory (for opening it differently).
    pub fn close(&mut self) {
        self.vault = None;
        let store = self.store.take().expect("store is open");
        assert_eq!(
            Arc::strong_count(&store),
            1,
            "someone still holds the store"
        );
        drop(store);
    }

    /// Every key and value in the store.
    pub fn scan_all(&self) -> Rows {
        scan_all(&**self.store())
    }

    pub async fn seal(&self, tenant: &str, credential: &str, kind: Kind, secret: &[u8]) -> u32 {
        self.vault()
            .seal(request(tenant, credential, kind, secret))
            .await
            .unwrap_or_else(|e| panic!("seal {tenant}/{credential}: {e}"))
            .version
    }

    /// Unseals and returns the secret bytes, panicking on any error.
    pub async fn unseal_bytes(
        &self,
        tenant: &str,
        credential: &str,
        version: Option<u32>,
    ) -> Vec<u8> {
        self.vault()
            .unseal(tenant, credential, version)
            .await
            .unwrap_or_else(|e| panic!("unseal {tenant}/{credential} {version:?}: {e}"))
            .secret
            .expose()
            .to_vec()
    }
}

/// Opens the sled store at `path` (group commit, a small cache).
pub fn open_store(path: &Path) -> Arc<SledStore> {
    open_store_with(path, 16 << 20)
}

/// Opens the sled store at `path` with group commit.
///
/// sled 0.34 finishes some log writes on its own thread pool, which holds the
/// data file (and its lock) for a moment after the last handle is dropped, so
/// an immediate reopen in the same process can find the lock taken. Wait for it.
pub fn open_store_with(path: &Path, cache_capacity: u64) -> Arc<SledStore> {
    let options = StoreOptions {
        cache_capacity,
        ..StoreOptions::new(path)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match SledStore::open(&options) {
            Ok(store) => return Arc::new(store),
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("open store {path:?}: {e}"),
        }
    }
}

pub async fn open_vault(
    store: &Arc<SledStore>,
    root: &[u8; 32],
    clock: &Arc<ManualClock>,
    options: VaultOptions,
) -> credvault::Result<Vault> {
    Vault::open(
        store.clone() as Arc<dyn Store>,
        key(root),
        clock.clone(),
        options,
    )
    .await
}

pub fn key(bytes: &[u8; 32]) -> SymmetricKey {
    SymmetricKey::from_slice(bytes).expect("32 bytes")
}

pub fn scan_all(store: &dyn Store) -> Rows {
    store.scan(b"", None, usize::MAX).expect("scan")
}

pub fn request(tenant: &str, credential: &str, kind: Kind, secret: &[u8]) -> SealRequest {
    SealRequest {
        tenant: tenant.into(),
        credential: credential.into(),
        kind,
        secret: Secret::new(secret.to_vec()),
        labels: BTreeMap::new(),
        expires_at_ms: None,
        expected_version: None,
    }
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// splitmix64: a tiny deterministic generator, so a secret can be recomputed from its id.
pub struct SplitMix(u64);

impl SplitMix {
    pub fn from_str(seed: &str) -> Self {
        // FNV-1a of the seed text.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self(h)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// A child process that is killed (SIGKILL) and reaped if the test ends
/// before it does.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs this test binary again as a child that runs only the test named
/// `test` (which does its work when it finds `envs` set), and reads what the
/// child acknowledges: the rest of each complete `ACK ` line it prints, sent
/// on the receiver as it arrives. A line the kill cut short was never
/// acknowledged and is not sent. The reader thread ends with the child's
/// output.
pub fn spawn_acking_child(
    test: &str,
    envs: &[(&str, String)],
) -> (
    KillOnDrop,
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", test, "--nocapture"])
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match lines.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if let Some(ack) = line.strip_suffix('\n').and_then(|l| l.strip_prefix("ACK "))
                && tx.send(ack.to_owned()).is_err()
            {
                return;
            }
        }
    });
    (KillOnDrop(child), rx, reader)
}

/// Prints `ACK {what}` and flushes it: the child's acknowledgement that
/// [`spawn_acking_child`] reads.
pub fn ack(what: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ACK {what}").expect("stdout");
    out.flush().expect("stdout");
}
