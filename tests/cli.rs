//! The `credvault` binary end to end: `dev` on an empty directory and again on the same one,
//! the client commands against it, `certs init`, `keygen`, `serve` refusing bad
//! configurations, no secret in the logs at TRACE, a graceful stop on SIGTERM,
//! `rotate …` / `keys status|destroy` through a KEK, tenant and root key rotation,
//! `tenant delete|restore|hold|release|status`, `watch` following revocations until the
//! server stops, and `audit query|tail|export|verify` (online, and offline on a stopped
//! server's store after one record was edited) with `[audit] retention` pruning, and
//! `backup` of a running server then `restore --check|--data-dir` offline, served again.
//!
//! Every test runs the real binary in its own temporary directory; servers listen on a free
//! 127.0.0.1 port and are killed by a guard even when the test fails. Readiness is a client
//! command that succeeds, never a sleep.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_credvault");

/// How long a server may take to answer its first call, and any command to exit. Generous:
/// these are hang guards, not measurements.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// Attempts at finding a port that is still free when the server binds it.
const BIND_ATTEMPTS: usize = 5;

/// Private keys and the root key: readable by the owner only.
const PRIVATE_MODE: u32 = 0o600;

/// The files of the dev PKI; every `.key` is private.
const PKI_FILES: [&str; 12] = [
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
    "executor.pem",
    "executor.key",
    "ingest.pem",
    "ingest.key",
    "settings.pem",
    "settings.key",
    "admin.pem",
    "admin.key",
];

// ---------------------------------------------------------------------------------------------
// Running the binary

/// `credvault` with nothing from the test's own environment that it reads.
fn credvault() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CREDVAULT_") {
            command.env_remove(name);
        }
    }
    command.env_remove("RUST_LOG").env("NO_COLOR", "1");
    command
}

/// What a finished command printed.
struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl Output {
    fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("stdout is UTF-8")
    }

    /// The single JSON value on stdout.
    fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!("stdout is not one JSON value ({e}): {}", self.stdout_text())
        })
    }

    #[track_caller]
    fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what}: {} — stderr: {}",
            self.status,
            self.stderr
        );
        self
    }

    /// Failed with an ordinary error (exit code 1), not a panic or a signal.
    #[track_caller]
    fn assert_failure(&self, what: &str) -> &Self {
        assert_eq!(
            self.status.code(),
            Some(1),
            "{what} should fail with exit code 1: {} — stderr: {}",
            self.status,
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{what}: {}", self.stderr);
        self
    }
}

/// Runs `command` to the end with `stdin` as its input.
fn run(command: &mut Command, stdin: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_vec();
    // The child may exit without reading its input: a broken pipe is no concern here.
    let writer = thread::spawn(move || drop(input.write_all(&stdin)));
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let Some(status) = wait_for_exit(&mut child, EXIT_TIMEOUT) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{command:?} did not exit within {EXIT_TIMEOUT:?}");
    };
    writer.join().expect("stdin writer");
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: String::from_utf8_lossy(&stderr.join().expect("stderr reader")).into_owned(),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        pipe.read_to_end(&mut bytes).expect("reading a pipe");
        bytes
    })
}

fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Sends SIGTERM to `child` and waits up to `EXIT_TIMEOUT` for it to exit.
fn sigterm_and_wait(child: &mut Child) -> Option<ExitStatus> {
    let sent = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("running kill");
    assert!(sent.success(), "kill -TERM {}: {sent}", child.id());
    wait_for_exit(child, EXIT_TIMEOUT)
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

// ---------------------------------------------------------------------------------------------
// A server child

/// A running `credvault dev` or `serve`, killed and reaped on drop.
struct Server {
    child: Child,
    port: u16,
    /// The directory holding `certs/`, as the client commands' `--dir`.
    dir: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    _logs: tempfile::TempDir,
}

enum Start {
    Ready,
    PortTaken,
}

impl Server {
    /// `credvault dev --dir DIR --listen 127.0.0.1:PORT` with the extra environment `env`.
    fn dev(dir: &Path, env: &[(&str, &str)]) -> Server {
        Server::start(dir, |port| {
            let mut command = credvault();
            command
                .arg("dev")
                .arg("--dir")
                .arg(dir)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .envs(env.iter().copied());
            command
        })
    }

    /// Starts `command(port)` on free ports until one binds, then waits until `list` answers.
    fn start(dir: &Path, command: impl Fn(u16) -> Command) -> Server {
        for _ in 0..BIND_ATTEMPTS {
            let port = free_port();
            let logs = tempfile::tempdir().expect("temp dir");
            let (stdout, stderr) = (logs.path().join("stdout"), logs.path().join("stderr"));
            let child = command(port)
                .stdin(Stdio::null())
                .stdout(fs::File::create(&stdout).expect("stdout file"))
                .stderr(fs::File::create(&stderr).expect("stderr file"))
                .spawn()
                .expect("spawning the server");
            let mut server = Server {
                child,
                port,
                dir: dir.to_owned(),
                stdout,
                stderr,
                _logs: logs,
            };
            match server.wait_until_ready() {
                Start::Ready => return server,
                Start::PortTaken => continue,
            }
        }
        panic!("no free port after {BIND_ATTEMPTS} attempts");
    }

    fn wait_until_ready(&mut self) -> Start {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let stderr = self.stderr_text();
                if stderr.contains("cannot bind") {
                    return Start::PortTaken;
                }
                panic!("the server exited before serving: {status}\n{stderr}");
            }
            let probe = run(
                self.client("list").args(["--tenant", "readiness-probe"]),
                b"",
            );
            if probe.status.success() {
                return Start::Ready;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the server did not answer within {READY_TIMEOUT:?}; last client error: {}\n\
                     server log: {}",
                    probe.stderr,
                    self.stderr_text()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// `credvault SUBCOMMAND --server localhost:PORT --dir DIR`.
    fn client(&self, subcommand: &str) -> Command {
        self.command(&[subcommand])
    }

    /// `credvault WORDS… --server localhost:PORT --dir DIR`, for nested subcommands
    /// (`rotate kek`, `keys status`): the connection flags belong to the last word.
    fn command(&self, words: &[&str]) -> Command {
        let mut command = credvault();
        command
            .args(words)
            .args(["--server", &format!("localhost:{}", self.port)])
            .arg("--dir")
            .arg(&self.dir);
        command
    }

    /// `credvault unseal --tenant TENANT --id ID` as the executor: the secret, which
    /// the call must return (`what` names it in a failure).
    #[track_caller]
    fn unsealed(&self, tenant: &str, id: &str, what: &str) -> Vec<u8> {
        let mut command = self.client("unseal");
        let output = run(command.args(["--tenant", tenant, "--id", id]), b"");
        output.assert_success(what).stdout.clone()
    }

    fn stdout_text(&self) -> String {
        fs::read_to_string(&self.stdout).expect("server stdout")
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr).expect("server stderr")).into_owned()
    }

    /// Sends SIGTERM and waits for the exit.
    fn terminate(&mut self) -> ExitStatus {
        sigterm_and_wait(&mut self.child).unwrap_or_else(|| {
            panic!(
                "the server did not stop within {EXIT_TIMEOUT:?} of SIGTERM\n{}",
                self.stderr_text()
            )
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Kill is a no-op on a child that has already been reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers

#[track_caller]
fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0; N];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    bytes
}

/// Removes ANSI colour sequences (`ESC [ … m`), in case the log is coloured anyway.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn dev_on_an_empty_directory_serves_the_client_commands_and_a_restart_reuses_everything() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    assert_eq!(fs::read_dir(dir).unwrap().count(), 0);
    let mut server = Server::dev(dir, &[]);

    // What the first run created.
    let certs = dir.join("certs");
    for file in PKI_FILES {
        let path = certs.join(file);
        assert!(path.is_file(), "{} missing", path.display());
        if file.ends_with(".key") {
            assert_eq!(mode(&path), PRIVATE_MODE, "{}", path.display());
        }
    }
    let data = dir.join("data");
    assert_eq!(mode(&data.join("root.key")), PRIVATE_MODE);
    assert!(data.join("policy.toml").is_file());
    assert!(data.join("store").is_dir());
    let tour = server.stdout_text();
    assert!(tour.contains("credvault seal"), "{tour}");
    assert!(
        tour.contains(&format!("--server localhost:{}", server.port)),
        "{tour}"
    );
    assert!(tour.contains(&format!("--dir {}", dir.display())), "{tour}");

    // Seal from stdin: binary, with a NUL, invalid UTF-8 and a trailing newline kept as is.
    let first: &[u8] = b"SID=31d4d96e407aad42; HSID=\xff\xfe\x00\x80\xc3(; end\n";
    let sealed = run(
        server.client("seal").args([
            "--tenant",
            "acme",
            "--id",
            "gmail",
            "--kind",
            "cookie-jar",
            "--label",
            "site=mail.google.com",
            "--label",
            "k=v",
        ]),
        first,
    );
    let meta = sealed.assert_success("seal from stdin").json();
    assert_eq!(meta["version"], 1, "{meta}");
    assert_eq!(meta["kind"], "COOKIE_JAR", "{meta}");
    assert_eq!(meta["labels"]["k"], "v", "{meta}");
    assert_eq!(meta["labels"]["site"], "mail.google.com", "{meta}");
    assert_eq!(meta["size_bytes"], first.len(), "{meta}");

    // Seal from --file: a second version of the same credential.
    let second: &[u8] = b"SID=9b2e0c77a1f5d3e8;\x00\x01\xe2\x82 second\xf0\x28\x8c\xbc";
    let file = tmp.path().join("jar.bin");
    fs::write(&file, second).unwrap();
    let sealed = run(
        server
            .client("seal")
            .args(["--tenant", "acme", "--id", "gmail", "--kind", "cookie-jar"])
            .args(["--label", "k=v", "--file"])
            .arg(&file),
        b"ignored: the secret comes from --file",
    );
    let meta = sealed.assert_success("seal --file").json();
    assert_eq!(meta["version"], 2, "{meta}");
    assert_eq!(meta["size_bytes"], second.len(), "{meta}");

    // And another credential, so that list has more than one line.
    let api_key: &[u8] = b"sk-test-4f1c2a9e8b7d6c5a";
    run(
        server
            .client("seal")
            .args(["--tenant", "acme", "--id", "openai", "--kind", "api-key"]),
        api_key,
    )
    .assert_success("seal api-key");

    // Unseal prints exactly the secret bytes, nothing else.
    let unsealed = run(
        server
            .client("unseal")
            .args(["--tenant", "acme", "--id", "gmail", "--purpose", "test"]),
        b"",
    );
    assert_eq!(unsealed.assert_success("unseal").stdout, second);
    let unsealed = run(
        server
            .client("unseal")
            .args(["--tenant", "acme", "--id", "gmail", "--version", "1"]),
        b"",
    );
    assert_eq!(unsealed.assert_success("unseal --version 1").stdout, first);

    // Metadata and list: JSON, never the secret.
    let secret_markers: [&[u8]; 3] = [b"31d4d96e407aad42", b"9b2e0c77a1f5d3e8", b"sk-test-4f1c"];
    let shown = run(
        server
            .client("meta")
            .args(["--tenant", "acme", "--id", "gmail"]),
        b"",
    );
    let meta = shown.assert_success("meta").json();
    assert_eq!(meta["version"], 2, "{meta}");
    assert_eq!(meta["latest_version"], 2, "{meta}");
    assert_eq!(meta["kind"], "COOKIE_JAR", "{meta}");
    assert!(meta.get("secret").is_none(), "{meta}");
    let listed = run(server.client("list").args(["--tenant", "acme"]), b"");
    listed.assert_success("list");
    let lines: Vec<Value> = listed
        .stdout_text()
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON value per line"))
        .collect();
    let mut ids: Vec<&str> = lines
        .iter()
        .map(|m| m["credential_id"].as_str().expect("credential_id"))
        .collect();
    ids.sort();
    assert_eq!(ids, ["gmail", "openai"], "{}", listed.stdout_text());
    assert!(lines.iter().all(|m| m["tenant_id"] == "acme"));
    for output in [&shown, &listed] {
        for marker in secret_markers {
            assert!(
                !contains(&output.stdout, marker),
                "{}",
                output.stdout_text()
            );
        }
    }

    // Revoke prints the tombstone; the next unseal is refused with REVOKED.
    let revoked = run(
        server
            .client("revoke")
            .args(["--tenant", "acme", "--id", "gmail", "--reason", "leaked"]),
        b"",
    );
    let tombstone = revoked.assert_success("revoke").json();
    assert_eq!(tombstone["reason"], "leaked", "{tombstone}");
    assert_eq!(
        tombstone["revoked_by"], "spiffe://credvault/settings/dev",
        "{tombstone}"
    );
    assert!(
        tombstone["revoked_at_ms"].as_u64().unwrap_or(0) > 0,
        "{tombstone}"
    );
    let refused = run(
        server
            .client("unseal")
            .args(["--tenant", "acme", "--id", "gmail"]),
        b"",
    );
    refused.assert_failure("unseal after revoke");
    assert!(refused.stderr.contains("REVOKED"), "{}", refused.stderr);
    assert!(refused.stdout.is_empty(), "{:?}", refused.stdout);

    // A second run on the same directory reuses the PKI, the root key and the store.
    let before: Vec<(PathBuf, Vec<u8>)> = [
        certs.join("ca.pem"),
        certs.join("server.key"),
        certs.join("executor.pem"),
        data.join("root.key"),
        data.join("policy.toml"),
    ]
    .into_iter()
    .map(|path| {
        let bytes = fs::read(&path).unwrap();
        (path, bytes)
    })
    .collect();
    assert!(server.terminate().success(), "{}", server.stderr_text());
    drop(server);

    let server = Server::dev(dir, &[]);
    for (path, bytes) in &before {
        assert_eq!(
            &fs::read(path).unwrap(),
            bytes,
            "{} changed",
            path.display()
        );
    }
    let listed = run(server.client("list").args(["--tenant", "acme"]), b"");
    let text = listed.assert_success("list after restart").stdout_text();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert_eq!(
        server.unsealed("acme", "openai", "unseal after restart"),
        api_key
    );
    let refused = run(
        server
            .client("unseal")
            .args(["--tenant", "acme", "--id", "gmail"]),
        b"",
    );
    refused.assert_failure("unseal of a revoked credential after restart");
    assert!(refused.stderr.contains("REVOKED"), "{}", refused.stderr);
}

#[test]
fn certs_init_and_keygen_write_private_files_and_never_overwrite() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let pki = tmp.path().join("pki");
    let init = run(credvault().args(["certs", "init", "--dir"]).arg(&pki), b"");
    let report = init.assert_success("certs init").stdout_text();
    assert_eq!(mode(&pki), 0o700);
    for file in PKI_FILES {
        let path = pki.join(file);
        assert!(
            report.contains(&format!("created {}", path.display())),
            "{report}"
        );
        if file.ends_with(".key") {
            assert_eq!(mode(&path), PRIVATE_MODE, "{}", path.display());
        }
    }
    let ca = fs::read(pki.join("ca.pem")).unwrap();
    let again = run(credvault().args(["certs", "init", "--dir"]).arg(&pki), b"");
    let report = again.assert_success("second certs init").stdout_text();
    assert!(!report.contains("created"), "{report}");
    assert_eq!(
        report.matches("reused ").count(),
        PKI_FILES.len(),
        "{report}"
    );
    assert_eq!(fs::read(pki.join("ca.pem")).unwrap(), ca);

    let key = tmp.path().join("root.key");
    run(credvault().arg("keygen").arg("--out").arg(&key), b"").assert_success("keygen");
    assert_eq!(mode(&key), PRIVATE_MODE);
    let written = fs::read_to_string(&key).unwrap();
    let decoded = STANDARD.decode(written.trim()).expect("a base64 key");
    assert_eq!(decoded.len(), 32);
    let refused = run(credvault().arg("keygen").arg("--out").arg(&key), b"");
    refused.assert_failure("keygen over an existing key");
    assert!(!refused.stderr.is_empty());
    assert_eq!(
        fs::read_to_string(&key).unwrap(),
        written,
        "key overwritten"
    );
}

/// A working `serve` setup: dev PKI, root key and policy under `dir`, and its config text.
fn serve_setup(dir: &Path) -> String {
    run(
        credvault()
            .args(["certs", "init", "--dir"])
            .arg(dir.join("certs")),
        b"",
    )
    .assert_success("certs init");
    run(
        credvault()
            .arg("keygen")
            .arg("--out")
            .arg(dir.join("root.key")),
        b"",
    )
    .assert_success("keygen");
    fs::write(dir.join("policy.toml"), credvault::authz::DEV_POLICY_TOML).unwrap();
    serve_config(
        &dir.join("store"),
        &dir.join("root.key"),
        &dir.join("policy.toml"),
        &dir.join("certs"),
    )
}

/// The text of a `serve` config over these files (the server's certificate, key and the
/// client CA from `certs`, as `certs init` writes them).
fn serve_config(data_dir: &Path, root_key: &Path, policy: &Path, certs: &Path) -> String {
    let quoted = |path: &Path| format!("{:?}", path.display().to_string());
    format!(
        "listen = \"127.0.0.1:0\"\n\
         data_dir = {}\n\
         root_key_file = {}\n\
         policy_file = {}\n\
         \n\
         [tls]\n\
         cert = {}\n\
         key = {}\n\
         client_ca = {}\n",
        quoted(data_dir),
        quoted(root_key),
        quoted(policy),
        quoted(&certs.join("server.pem")),
        quoted(&certs.join("server.key")),
        quoted(&certs.join("ca.pem")),
    )
}

/// A config that `serve` must refuse, and what its error must say.
struct BadConfig {
    case: &'static str,
    text: String,
    /// Environment for the run.
    env: &'static [(&'static str, &'static str)],
    /// Substrings of stderr; `{file}` stands for the config file's path.
    expected: &'static [&'static str],
}

#[test]
fn serve_refuses_a_bad_config_at_start_naming_the_field() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let good = serve_setup(tmp.path());
    let head = good.split_once("[tls]").expect("a [tls] table").0;
    let cases = [
        BadConfig {
            case: "unknown key",
            text: format!("bogus_key = 1\n{good}"),
            env: &[],
            expected: &["config file {file}", "bogus_key", "line 1"],
        },
        BadConfig {
            case: "bad listen",
            text: good.replace("127.0.0.1:0", "nonsense"),
            env: &[],
            expected: &["config file {file}", "listen", "nonsense", "line 1"],
        },
        BadConfig {
            case: "missing [tls]",
            text: head.to_owned(),
            env: &[],
            expected: &["config file {file}", "missing field `tls`"],
        },
        BadConfig {
            case: "rotate_after_encryptions = 0",
            text: format!("{good}\n[limits]\nrotate_after_encryptions = 0\n"),
            env: &[],
            expected: &["limits.rotate_after_encryptions"],
        },
        BadConfig {
            case: "CREDVAULT_LISTEN=nonsense",
            text: good.clone(),
            env: &[("CREDVAULT_LISTEN", "nonsense")],
            expected: &["CREDVAULT_LISTEN", "listen", "nonsense"],
        },
        BadConfig {
            case: "CREDVAULT_METRICS_LISTEN=9464",
            text: good.clone(),
            env: &[("CREDVAULT_METRICS_LISTEN", "9464")],
            expected: &["CREDVAULT_METRICS_LISTEN", "metrics_listen", "9464"],
        },
        BadConfig {
            case: "tls not a table, with a CREDVAULT_TLS_CERT override",
            text: format!("{head}tls = \"certs\"\n"),
            env: &[("CREDVAULT_TLS_CERT", "server.pem")],
            expected: &["config field `tls`"],
        },
    ];
    for (i, bad) in cases.iter().enumerate() {
        let file = tmp.path().join(format!("bad-{i}.toml"));
        fs::write(&file, &bad.text).unwrap();
        let refused = run(
            credvault()
                .arg("serve")
                .arg("--config")
                .arg(&file)
                .envs(bad.env.iter().copied()),
            b"",
        );
        refused.assert_failure(bad.case);
        for needle in bad.expected {
            let needle = needle.replace("{file}", &file.display().to_string());
            assert!(
                refused.stderr.contains(&needle),
                "{}: stderr lacks {needle:?}: {}",
                bad.case,
                refused.stderr
            );
        }
    }
    assert!(
        !tmp.path().join("store").exists(),
        "a refused config opened the store"
    );
}

#[test]
fn serve_refuses_a_world_readable_root_key_and_serves_once_it_is_private() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = tmp.path().join("credvault.toml");
    fs::write(&config, serve_setup(tmp.path())).unwrap();
    let key = tmp.path().join("root.key");

    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let refused = run(credvault().arg("serve").arg("--config").arg(&config), b"");
    refused.assert_failure("serve with a 0644 root key");
    for needle in ["root key file", "0644", "readable by group or others"] {
        assert!(refused.stderr.contains(needle), "{}", refused.stderr);
    }

    // The same setup with the key made private serves: the mode was the only problem.
    fs::set_permissions(&key, fs::Permissions::from_mode(PRIVATE_MODE)).unwrap();
    let mut server = Server::start(tmp.path(), |port| {
        let mut command = credvault();
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        command
    });
    assert!(server.terminate().success(), "{}", server.stderr_text());
}

#[test]
fn no_secret_reaches_the_log_at_trace_level() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut server = Server::dev(tmp.path(), &[("CREDVAULT_LOG", "trace")]);
    let hex64 = hex::encode(random_bytes::<32>());
    let token = STANDARD.encode(random_bytes::<24>());
    let secret = format!("sid={hex64}; token={token}");
    let call = |subcommand: &str, args: &[&str], stdin: &[u8]| {
        run(
            server
                .client(subcommand)
                .args(["--tenant", "logtest", "--id", "session"])
                .args(args),
            stdin,
        )
    };

    call(
        "seal",
        &["--kind", "cookie-jar", "--label", "k=v"],
        secret.as_bytes(),
    )
    .assert_success("seal");
    let unsealed = call("unseal", &["--purpose", "log test"], b"");
    assert_eq!(unsealed.assert_success("unseal").stdout, secret.as_bytes());
    call("meta", &[], b"").assert_success("meta");
    run(server.client("list").args(["--tenant", "logtest"]), b"").assert_success("list");
    call("revoke", &["--reason", "log test"], b"").assert_success("revoke");
    call("unseal", &[], b"").assert_failure("unseal after revoke");
    assert!(server.terminate().success(), "{}", server.stderr_text());

    let log = strip_ansi(&server.stderr_text());
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log is not at TRACE: {}",
        &log[..log.len().min(2000)]
    );
    assert!(log.contains("\"Unseal\""), "the calls were not logged");
    assert!(log.contains("credvault stopped"), "the log was cut short");

    let bytes = secret.as_bytes();
    let mut needles = vec![
        secret.clone(),
        hex64.clone(),
        hex64.to_uppercase(),
        token.clone(),
        hex::encode(bytes),
        URL_SAFE_NO_PAD.encode(bytes),
        // Debug of the bytes: `[115, 105, 100, …`.
        format!("{:?}", &bytes[..12])
            .trim_end_matches(']')
            .to_owned(),
    ];
    // Base64 of the secret inside a larger buffer, at each of the three alignments.
    for skip in 0..3 {
        let encoded = STANDARD.encode(&bytes[skip..]);
        needles.push(encoded[4..encoded.len() - 4].to_owned());
    }
    for needle in &needles {
        if let Some(line) = log.lines().find(|line| line.contains(needle.as_str())) {
            panic!("the log holds the secret as {needle:?}:\n{line}");
        }
    }
}

#[test]
fn sigterm_stops_dev_gracefully_with_status_0() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut server = Server::dev(tmp.path(), &[]);
    run(
        server
            .client("seal")
            .args(["--tenant", "acme", "--id", "jar"]),
        b"cookie",
    )
    .assert_success("seal");

    let status = server.terminate();
    let log = strip_ansi(&server.stderr_text());
    assert_eq!(status.code(), Some(0), "{status}\n{log}");
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("credvault stopped"), "{log}");
    let after = run(server.client("list").args(["--tenant", "acme"]), b"");
    after.assert_failure("list after the server stopped");
}

// ---------------------------------------------------------------------------------------------
// Rotation

/// `keys status --json` (of one tenant's DEKs, with the root key and KEKs).
fn key_status(server: &Server, tenant: Option<&str>) -> Value {
    let mut command = server.command(&["keys", "status", "--json"]);
    if let Some(tenant) = tenant {
        command.args(["--tenant", tenant]);
    }
    run(&mut command, b"").assert_success("keys status").json()
}

fn path_text(path: &Path) -> String {
    path.to_str().expect("a UTF-8 temp path").to_owned()
}

/// The row of `layer` version `version` (of `tenant`, for a DEK).
#[track_caller]
fn key_row<'a>(status: &'a Value, layer: &str, tenant: &str, version: u64) -> &'a Value {
    status["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .find(|row| {
            row["layer"] == layer && row["tenant_id"] == tenant && row["version"] == version
        })
        .unwrap_or_else(|| panic!("no {layer} v{version} {tenant:?} in {status:#}"))
}

/// The highest version of `layer` in a status.
fn latest(status: &Value, layer: &str) -> u64 {
    status["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .filter(|row| row["layer"] == layer)
        .filter_map(|row| row["version"].as_u64())
        .max()
        .unwrap_or(0)
}

/// A `--wait` run: succeeded, ended with `job ID done: N/N in …s`, and (not on a
/// terminal) drew no progress bar.
#[track_caller]
fn assert_waited(output: &Output, what: &str, job: &str) {
    output.assert_success(what);
    let text = output.stdout_text();
    let last = text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("job {job} done: ")) && last.ends_with('s'),
        "{what}: {text}"
    );
    let (done, total) = last
        .split_once("done: ")
        .and_then(|(_, rest)| rest.split_once(' '))
        .and_then(|(count, _)| count.split_once('/'))
        .expect("done/total");
    assert_eq!(done, total, "{what}: {text}");
    assert!(!contains(&output.stdout, b"\r"), "{what}: \\r on stdout");
    assert!(!output.stderr.contains('\r'), "{what}: \\r on stderr");
}

#[track_caller]
fn assert_refused(output: &Output, what: &str, needles: &[&str]) {
    output.assert_failure(what);
    for needle in needles {
        assert!(
            output.stderr.contains(needle),
            "{what}: stderr lacks {needle:?}: {}",
            output.stderr
        );
    }
}

#[test]
fn rotate_and_destroy_every_layer_from_the_command_line() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mut server = Server::dev(dir, &[]);
    let secrets: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                format!("cred-{i}"),
                format!("secret {i}: {}", hex::encode(random_bytes::<8>())).into_bytes(),
            )
        })
        .collect();
    for (id, secret) in &secrets {
        run(
            server.client("seal").args(["--tenant", "acme", "--id", id]),
            secret,
        )
        .assert_success("seal acme");
    }
    run(
        server
            .client("seal")
            .args(["--tenant", "globex", "--id", "one"]),
        b"globex secret",
    )
    .assert_success("seal globex");
    let unseal_all = |server: &Server, what: &str| {
        for (id, secret) in &secrets {
            let unsealed = run(
                server
                    .client("unseal")
                    .args(["--tenant", "acme", "--id", id]),
                b"",
            );
            assert_eq!(
                &unsealed.assert_success(what).stdout,
                secret,
                "{what}: {id}"
            );
        }
    };

    // KEK: a new primary, every DEK rewrapped onto it.
    let before = key_status(&server, None);
    let old_kek = latest(&before, "kek");
    let new_kek = old_kek + 1;
    let kek_job = format!("kek-v{new_kek}");
    let rotated = run(&mut server.command(&["rotate", "kek", "--wait"]), b"");
    assert_waited(&rotated, "rotate kek --wait", &kek_job);
    let first = rotated.stdout_text();
    let first = first.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("job {kek_job} (kek) ")),
        "{first}"
    );
    let status = key_status(&server, None);
    let (old, new) = (
        key_row(&status, "kek", "", old_kek),
        key_row(&status, "kek", "", new_kek),
    );
    assert_eq!(new["state"], "active", "{status:#}");
    assert_eq!(old["state"], "decrypt-only", "{status:#}");
    assert_eq!(old["protected_records"], 0, "{status:#}");
    assert!(old["retired_at_ms"].as_u64().unwrap_or(0) > 0, "{status:#}");
    assert!(new["retired_at_ms"].is_null(), "{status:#}");
    let dek = key_row(&status, "dek", "acme", 1);
    assert_eq!(dek["kek_version"], new_kek, "{status:#}");
    let shown = run(&mut server.command(&["rotate", "status", &kek_job]), b"");
    let line = shown.assert_success("rotate status").stdout_text();
    assert!(
        line.starts_with(&format!("job {kek_job} (kek) done: ")),
        "{line}"
    );

    // The primary cannot be destroyed; the rewrapped old version can, once.
    let refused = run(
        &mut server.command(&[
            "keys",
            "destroy",
            "--layer",
            "kek",
            "--version",
            &new_kek.to_string(),
        ]),
        b"",
    );
    assert_refused(&refused, "destroying the primary KEK", &["KEY_IS_PRIMARY"]);
    let destroyed = run(
        &mut server.command(&[
            "keys",
            "destroy",
            "--layer",
            "kek",
            "--version",
            &old_kek.to_string(),
        ]),
        b"",
    );
    assert_eq!(
        destroyed
            .assert_success("destroying the old KEK")
            .stdout_text(),
        format!("destroyed kek v{old_kek}\n")
    );
    let status = key_status(&server, None);
    let old = key_row(&status, "kek", "", old_kek);
    assert_eq!(old["state"], "destroyed", "{status:#}");
    assert!(
        old["destroyed_at_ms"].as_u64().unwrap_or(0) > 0,
        "{status:#}"
    );
    unseal_all(&server, "unseal after the KEK rotation");

    // A tenant's DEK, re-encrypting its credentials: the old DEK protects nothing.
    let rotated = run(
        &mut server.command(&["rotate", "tenant", "acme", "--reencrypt", "--wait"]),
        b"",
    );
    assert_waited(&rotated, "rotate tenant --reencrypt --wait", "dek-acme-v2");
    let status = key_status(&server, Some("acme"));
    assert_eq!(
        key_row(&status, "dek", "acme", 2)["state"],
        "active",
        "{status:#}"
    );
    let old_dek = key_row(&status, "dek", "acme", 1);
    assert_eq!(old_dek["state"], "decrypt-only", "{status:#}");
    assert_eq!(old_dek["protected_records"], 0, "{status:#}");
    assert_eq!(
        key_row(&status, "dek", "acme", 2)["protected_records"],
        secrets.len(),
        "{status:#}"
    );
    unseal_all(&server, "unseal after the re-encryption");
    let missing = run(
        &mut server.command(&["keys", "destroy", "--layer", "dek", "--version", "1"]),
        b"",
    );
    // A usage error: clap's exit code 2, naming the missing flag.
    assert_eq!(missing.status.code(), Some(2), "{}", missing.stderr);
    assert!(missing.stderr.contains("--tenant"), "{}", missing.stderr);
    let destroyed = run(
        &mut server.command(&[
            "keys",
            "destroy",
            "--layer",
            "dek",
            "--tenant",
            "acme",
            "--version",
            "1",
        ]),
        b"",
    );
    assert_eq!(
        destroyed
            .assert_success("destroying acme's old DEK")
            .stdout_text(),
        "destroyed dek v1 of tenant acme\n"
    );
    let unknown = run(
        &mut server.command(&["rotate", "tenant", "nobody", "--wait"]),
        b"",
    );
    assert_refused(
        &unknown,
        "rotating an unknown tenant",
        &["NOT_FOUND", "nobody"],
    );

    // Root: a key file that others can read is refused, naming the problem; nothing changes.
    let root_before = latest(&key_status(&server, None), "root");
    let loose = dir.join("loose.key");
    run(credvault().arg("keygen").arg("--out").arg(&loose), b"").assert_success("keygen");
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
    let loose_text = fs::read_to_string(&loose).unwrap();
    let refused = run(
        &mut server.command(&["rotate", "root", "--new-root-key-file", &path_text(&loose)]),
        b"",
    );
    assert_refused(
        &refused,
        "rotate root with a 0644 key file",
        &[
            "InvalidArgument",
            "ROOT_KEY_UNAVAILABLE",
            "0644",
            "readable by group or others",
        ],
    );
    assert!(
        !refused.stderr.contains(loose_text.trim()),
        "{}",
        refused.stderr
    );
    let missing_file = run(
        &mut server.command(&[
            "rotate",
            "root",
            "--new-root-key-file",
            &path_text(&dir.join("no-such.key")),
        ]),
        b"",
    );
    assert_refused(
        &missing_file,
        "rotate root with no file",
        &["ROOT_KEY_UNAVAILABLE", "no-such.key"],
    );
    assert_eq!(latest(&key_status(&server, None), "root"), root_before);

    // A good key file: every KEK rewrapped; the operator is told what to do next.
    let new_root = dir.join("new-root.key");
    run(credvault().arg("keygen").arg("--out").arg(&new_root), b"").assert_success("keygen");
    let new_root_text = fs::read_to_string(&new_root).unwrap();
    let rotated = run(
        &mut server.command(&[
            "rotate",
            "root",
            "--wait",
            "--new-root-key-file",
            &path_text(&new_root),
        ]),
        b"",
    );
    let root_job = format!("root-v{}", root_before + 1);
    assert_waited_prefix(&rotated, &root_job);
    let text = rotated.stdout_text();
    for needle in ["new root key", "Configure the server", "backups", "destroy"] {
        assert!(text.contains(needle), "{needle:?}: {text}");
    }
    assert!(text.contains(&new_root.display().to_string()), "{text}");
    let status = key_status(&server, None);
    assert_eq!(latest(&status, "root"), root_before + 1, "{status:#}");
    assert_eq!(
        key_row(&status, "root", "", root_before + 1)["state"],
        "active",
        "{status:#}"
    );
    unseal_all(&server, "unseal after the root rotation");

    let unknown = run(&mut server.command(&["rotate", "status", "nosuch"]), b"");
    assert_refused(
        &unknown,
        "rotate status nosuch",
        &["NotFound", "JOB_NOT_FOUND"],
    );

    // The server logged the jobs, and never a key.
    assert!(server.terminate().success(), "{}", server.stderr_text());
    let log = strip_ansi(&server.stderr_text());
    assert!(log.contains("rotation job done"), "{log}");
    assert!(log.contains(&kek_job), "{log}");
    for key in [&new_root_text, &loose_text] {
        assert!(!log.contains(key.trim()), "a root key in the log");
    }
    drop(server);

    // The old root key no longer opens the store; the new one does.
    let old_start = run(
        credvault()
            .arg("dev")
            .arg("--dir")
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())]),
        b"",
    );
    assert_refused(&old_start, "dev with the retired root key", &["root key"]);
    fs::copy(&new_root, dir.join("data/root.key")).unwrap();
    fs::set_permissions(
        dir.join("data/root.key"),
        fs::Permissions::from_mode(PRIVATE_MODE),
    )
    .unwrap();
    let server = Server::dev(dir, &[]);
    unseal_all(&server, "unseal after a restart with the new root key");
}

/// A root rotation's `--wait` run: its job line, then the done line, then the advice.
#[track_caller]
fn assert_waited_prefix(output: &Output, job: &str) {
    output.assert_success("rotate root --wait");
    let text = output.stdout_text();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("job {job} (root-key) done: ")),
        "{text}"
    );
    let second = lines.next().unwrap_or_default();
    assert!(second.starts_with(&format!("job {job} done: ")), "{text}");
    assert!(
        !contains(&output.stdout, b"\r") && !output.stderr.contains('\r'),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Tenant lifecycle and revocation events

/// `tenant WORD ID… --json` (settings dev certificate): the tenant status it printed.
#[track_caller]
fn tenant(server: &Server, word: &str, args: &[&str]) -> Value {
    let output = run(
        server.command(&["tenant", word]).args(args).arg("--json"),
        b"",
    );
    output
        .assert_success(&format!("tenant {word} {args:?}"))
        .json()
}

#[test]
fn tenant_delete_disables_at_once_restore_brings_it_back_and_grace_zero_shreds() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let server = Server::dev(tmp.path(), &[]);
    for (tenant, id) in [("acme", "gmail"), ("globex", "jar"), ("globex", "key")] {
        run(
            server.client("seal").args(["--tenant", tenant, "--id", id]),
            format!("secret of {tenant}/{id}").as_bytes(),
        )
        .assert_success("seal");
    }
    let unseal = || {
        run(
            server
                .client("unseal")
                .args(["--tenant", "acme", "--id", "gmail"]),
            b"",
        )
    };
    assert_eq!(
        unseal().assert_success("unseal").stdout,
        b"secret of acme/gmail"
    );
    let active = tenant(&server, "status", &["acme"]);
    assert_eq!(active["state"], "active", "{active}");
    assert!(active["deleted_at_ms"].is_null(), "{active}");

    // Delete: refused at once, with the default grace of 7 days.
    let deleted = tenant(&server, "delete", &["acme"]);
    assert_eq!(deleted["state"], "deleted", "{deleted}");
    assert_eq!(
        deleted["deleted_by"], "spiffe://credvault/settings/dev",
        "{deleted}"
    );
    let (at, shred_after) = (
        deleted["deleted_at_ms"].as_u64().expect("deleted_at_ms"),
        deleted["shred_after_ms"].as_u64().expect("shred_after_ms"),
    );
    assert_eq!(shred_after - at, 7 * 86_400_000, "{deleted}");
    let refused = unseal();
    assert_refused(&refused, "unseal of a deleted tenant", &["TENANT_DELETED"]);
    assert!(refused.stdout.is_empty(), "{:?}", refused.stdout);
    let status = tenant(&server, "status", &["acme"]);
    assert_eq!(
        (&status["state"], &status["shred_after_ms"]),
        (&"deleted".into(), &shred_after.into()),
        "{status}"
    );
    let shown = run(server.command(&["tenant", "status"]).arg("acme"), b"");
    let text = shown.assert_success("tenant status (text)").stdout_text();
    assert!(text.starts_with("tenant acme: deleted\n"), "{text}");
    assert!(text.contains("shred after"), "{text}");
    assert!(text.contains("spiffe://credvault/settings/dev"), "{text}");

    // Legal hold on and off.
    let held = tenant(&server, "hold", &["acme", "--reason", "case 42"]);
    assert_eq!(
        (&held["legal_hold"], &held["legal_hold_reason"]),
        (&true.into(), &"case 42".into()),
        "{held}"
    );
    assert_eq!(held["state"], "deleted", "{held}");
    let status = tenant(&server, "status", &["acme"]);
    assert_eq!(status["legal_hold"], true, "{status}");
    let released = tenant(&server, "release", &["acme"]);
    assert_eq!(released["legal_hold"], false, "{released}");
    assert!(released["legal_hold_reason"].is_null(), "{released}");

    // Restore: everything is back; restoring again is refused.
    let restored = tenant(&server, "restore", &["acme"]);
    assert_eq!(restored["state"], "active", "{restored}");
    assert_eq!(
        unseal().assert_success("unseal after restore").stdout,
        b"secret of acme/gmail"
    );
    let again = run(server.command(&["tenant", "restore"]).arg("acme"), b"");
    assert_refused(
        &again,
        "restore of an active tenant",
        &["TENANT_NOT_DELETED"],
    );

    // Bad requests: a grace over 30 days, a tenant the vault never held.
    let too_long = run(
        server
            .command(&["tenant", "delete"])
            .args(["acme", "--grace", "31d"]),
        b"",
    );
    assert_refused(&too_long, "delete --grace 31d", &["INVALID_GRACE"]);
    assert_eq!(tenant(&server, "status", &["acme"])["state"], "active");
    let unknown = run(server.command(&["tenant", "status"]).arg("nobody"), b"");
    assert_refused(&unknown, "status of an unknown tenant", &["NOT_FOUND"]);

    // Grace 0: the background task shreds it and keeps a receipt.
    let deleted = tenant(&server, "delete", &["globex", "--grace", "0s"]);
    assert_eq!(deleted["state"], "deleted", "{deleted}");
    let deadline = Instant::now() + READY_TIMEOUT;
    let shredded = loop {
        let status = tenant(&server, "status", &["globex"]);
        if status["state"] == "shredded" {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "not shredded within {READY_TIMEOUT:?}: {status}"
        );
        thread::sleep(POLL);
    };
    let receipt = &shredded["receipt"];
    assert_eq!(receipt["purged_credentials"], 2, "{shredded}");
    assert_eq!(receipt["purged_versions"], 2, "{shredded}");
    assert_eq!(
        receipt["requested_by"], "spiffe://credvault/settings/dev",
        "{shredded}"
    );
    assert!(
        !receipt["destroyed_dek_versions"]
            .as_array()
            .expect("destroyed_dek_versions")
            .is_empty(),
        "{shredded}"
    );
    let gone = run(
        server
            .client("unseal")
            .args(["--tenant", "globex", "--id", "jar"]),
        b"",
    );
    gone.assert_failure("unseal of a shredded tenant");
    let restore = run(server.command(&["tenant", "restore"]).arg("globex"), b"");
    assert_refused(
        &restore,
        "restore of a shredded tenant",
        &["TENANT_SHREDDED"],
    );
    // The other tenant was untouched throughout.
    assert_eq!(
        unseal().assert_success("acme after globex's shred").stdout,
        b"secret of acme/gmail"
    );
}

/// A running streaming command (`watch`, `audit tail --follow`): its stdout
/// lines as they come, killed on drop.
struct Streaming {
    /// The command, for messages.
    name: &'static str,
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: Option<thread::JoinHandle<Vec<u8>>>,
}

impl Streaming {
    /// `credvault watch ARGS`.
    fn watch(server: &Server, args: &[&str]) -> Streaming {
        let mut command = server.client("watch");
        command.args(args);
        Self::start(command, "watch")
    }

    /// `credvault audit tail --follow ARGS`.
    fn follow_audit(server: &Server, args: &[&str]) -> Streaming {
        let mut command = server.command(&["audit", "tail"]);
        command.arg("--follow").args(args);
        Self::start(command, "audit tail --follow")
    }

    fn start(mut command: Command, name: &'static str) -> Streaming {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning credvault {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Some(drain(child.stderr.take().expect("stderr")));
        Streaming {
            name,
            child,
            lines,
            stderr,
        }
    }

    /// The next line, as JSON; panics after a generous hang guard.
    #[track_caller]
    fn next(&mut self, what: &str) -> Value {
        let line = self.lines.recv_timeout(READY_TIMEOUT).unwrap_or_else(|e| {
            let _ = self.child.kill();
            let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
            panic!(
                "{what}: no line from `{}` within {READY_TIMEOUT:?} ({e}); stderr: {}",
                self.name,
                String::from_utf8_lossy(&stderr.unwrap_or_default())
            )
        });
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line}"))
    }

    /// Waits for the exit; its status and stderr.
    fn wait(&mut self) -> (ExitStatus, String) {
        let status = wait_for_exit(&mut self.child, EXIT_TIMEOUT)
            .unwrap_or_else(|| panic!("`{}` did not exit within {EXIT_TIMEOUT:?}", self.name));
        (status, self.stderr_text())
    }

    /// Sends SIGTERM; the exit status, stderr and any lines not yet read.
    fn terminate(&mut self) -> (ExitStatus, String, Vec<String>) {
        let status = sigterm_and_wait(&mut self.child).unwrap_or_else(|| {
            panic!(
                "`{}` did not exit within {EXIT_TIMEOUT:?} of SIGTERM",
                self.name
            )
        });
        let stderr = self.stderr_text();
        // The reader thread ends with the pipe: everything printed is in the channel.
        let rest = self.lines.iter().collect();
        (status, stderr, rest)
    }

    fn stderr_text(&mut self) -> String {
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
        String::from_utf8_lossy(&stderr.unwrap_or_default()).into_owned()
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An event line: its sequence, kind, tenant and credential ("" for a tenant-wide event,
/// printed as null).
#[track_caller]
fn assert_event(event: &Value, sequence: u64, kind: &str, tenant: &str, credential: &str) {
    assert_eq!(
        (
            event["sequence"].as_u64(),
            event["kind"].as_str(),
            event["tenant_id"].as_str(),
            event["credential_id"].as_str().unwrap_or_default()
        ),
        (Some(sequence), Some(kind), Some(tenant), credential),
        "{event}"
    );
    assert!(event["at_ms"].as_u64().unwrap_or(0) > 0, "{event}");
}

#[test]
fn watch_prints_each_revocation_as_a_json_line_and_exits_0_when_the_server_stops() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut server = Server::dev(tmp.path(), &[]);
    for (tenant, id) in [("acme", "gmail"), ("globex", "jar"), ("acme", "old")] {
        run(
            server.client("seal").args(["--tenant", tenant, "--id", id]),
            b"cookie",
        )
        .assert_success("seal");
    }
    let revoke = |tenant: &str, id: &str| {
        run(
            server
                .client("revoke")
                .args(["--tenant", tenant, "--id", id, "--reason", "test"]),
            b"",
        )
        .assert_success("revoke");
    };
    // One event before the watchers: `--after 0` means "from now", so the position the
    // replaying watcher resumes from must be past 0.
    revoke("acme", "old");

    // From now, with keepalives: the first line is the position it starts from, which
    // is also how the test knows the watcher is subscribed.
    let mut from_now = Streaming::watch(&server, &["--keepalives"]);
    let opening = from_now.next("opening keepalive");
    assert_eq!(opening["kind"], "KEEPALIVE", "{opening}");
    assert!(opening["tenant_id"].is_null(), "{opening}");
    let start = opening["sequence"].as_u64().expect("sequence");
    assert!(start >= 1, "{opening}");
    // Only globex's events, from that same position.
    let after = start.to_string();
    let mut only_globex = Streaming::watch(&server, &["--tenant", "globex", "--after", &after]);

    revoke("acme", "gmail");
    let event = from_now.next("acme's revocation");
    assert_event(&event, start + 1, "CREDENTIAL_REVOKED", "acme", "gmail");
    revoke("globex", "jar");
    let event = from_now.next("globex's revocation");
    assert_event(&event, start + 2, "CREDENTIAL_REVOKED", "globex", "jar");
    let event = only_globex.next("globex's revocation, filtered");
    assert_event(&event, start + 2, "CREDENTIAL_REVOKED", "globex", "jar");

    // A watcher started later from the old position replays both, in order.
    let mut replay = Streaming::watch(&server, &["--after", &after]);
    assert_event(
        &replay.next("replayed first"),
        start + 1,
        "CREDENTIAL_REVOKED",
        "acme",
        "gmail",
    );
    assert_event(
        &replay.next("replayed second"),
        start + 2,
        "CREDENTIAL_REVOKED",
        "globex",
        "jar",
    );
    // Deleting a tenant is an event too.
    let deleted = run(server.command(&["tenant", "delete"]).arg("acme"), b"");
    deleted.assert_success("tenant delete");
    let event = replay.next("tenant deleted");
    assert_event(&event, start + 3, "TENANT_DISABLED", "acme", "");
    assert!(event["credential_id"].is_null(), "{event}");

    // SIGTERM: the server ends the streams, drains and stops; every watcher exits 0.
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "{status}\n{}", server.stderr_text());
    for (what, watcher) in [
        ("from now", &mut from_now),
        ("only globex", &mut only_globex),
        ("replay", &mut replay),
    ] {
        let (status, stderr) = watcher.wait();
        assert_eq!(status.code(), Some(0), "watch {what}: {status}: {stderr}");
        assert!(
            stderr.contains("the server ended the stream"),
            "{what}: {stderr}"
        );
    }

    // An error when the call starts (here a malformed tenant id) is a non-zero exit.
    let restarted = Server::dev(tmp.path(), &[]);
    let mut bad = Streaming::watch(&restarted, &["--tenant", "not a tenant"]);
    let (status, stderr) = bad.wait();
    assert_eq!(status.code(), Some(1), "{status}: {stderr}");
    assert!(stderr.contains("INVALID_ID"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Audit

/// `credvault audit WORD ARGS… --server … --dir …`.
fn audit(server: &Server, word: &str, args: &[&str]) -> Output {
    run(server.command(&["audit", word]).args(args), b"")
}

/// Each stdout line as JSON.
#[track_caller]
fn json_lines(output: &Output) -> Vec<Value> {
    output
        .stdout_text()
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect()
}

/// A record's rpc, caller, outcome, purpose, credential and version.
fn record_fields(record: &Value) -> (&str, &str, &str, &str, &str, u64) {
    (
        record["rpc"].as_str().unwrap_or("?"),
        record["caller"].as_str().unwrap_or("?"),
        record["outcome"].as_str().unwrap_or("?"),
        record["purpose"].as_str().unwrap_or("?"),
        record["credential_id"].as_str().unwrap_or("?"),
        record["version"].as_u64().unwrap_or(u64::MAX),
    )
}

fn sequences(records: &[Value]) -> Vec<u64> {
    records
        .iter()
        .map(|r| r["sequence"].as_u64().expect("sequence"))
        .collect()
}

/// `credvault audit verify --data-dir STORE --root-key-file KEY` on a `dev` directory.
fn verify_offline(dir: &Path) -> Output {
    run(&mut verify_offline_command(dir), b"")
}

fn verify_offline_command(dir: &Path) -> Command {
    offline_audit_command(dir, "verify", &dir.join("data/store"))
}

/// `credvault audit SUBCOMMAND --data-dir STORE --root-key-file KEY`, the key of the `dev`
/// directory `dir`.
fn offline_audit_command(dir: &Path, subcommand: &str, store: &Path) -> Command {
    let mut command = credvault();
    command
        .args(["audit", subcommand, "--data-dir"])
        .arg(store)
        .arg("--root-key-file")
        .arg(dir.join("data/root.key"));
    command
}

/// The count in the line `audit chain ok: N records (sequence A to B)`.
#[track_caller]
fn verified_count(text: &str) -> u64 {
    text.lines()
        .find_map(|line| line.trim().strip_prefix("audit chain ok: "))
        .and_then(|rest| rest.split_once(" records"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no `audit chain ok: N records`: {text:?}"))
}

/// The head `verify` printed (`head: SEQUENCE:MAC (keep it; …)`), and its sequence number.
#[track_caller]
fn printed_head(output: &Output) -> (String, u64) {
    let text = output.stdout_text();
    let head = text
        .lines()
        .find_map(|line| line.strip_prefix("head: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `head: SEQUENCE:MAC`: {text:?}"));
    let sequence = head.split(':').next().and_then(|n| n.parse().ok());
    (head.to_owned(), sequence.expect("a sequence number"))
}

/// Changes the stored audit records of a stopped server's store through the library, as
/// someone who can write its files could: `change` turns the records (key, value) into a
/// batch, committed like any write.
fn rewrite_audit_records(
    store_dir: &Path,
    change: impl FnOnce(Vec<(Vec<u8>, Vec<u8>)>) -> credvault::store::Batch,
) {
    use credvault::store::{SledStore, Store, StoreOptions};
    let store = SledStore::open(&StoreOptions::new(store_dir)).expect("opening the stopped store");
    let rows = store
        .scan(credvault::audit::PREFIX, None, usize::MAX)
        .expect("scanning the audit records");
    let batch = change(rows);
    assert!(!batch.ops.is_empty(), "nothing to change");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(store.commit(batch))
        .expect("committing the change");
}

/// Deletes the stored audit records from `first` on: what is left is a valid chain.
fn cut_audit_records_from(store_dir: &Path, first: u64) {
    let start = credvault::store::log_key(credvault::audit::PREFIX, first);
    rewrite_audit_records(store_dir, |rows| {
        let mut batch = credvault::store::Batch::default();
        for (key, _) in rows.into_iter().filter(|(key, _)| *key >= start) {
            batch.delete(key);
        }
        batch
    });
}

/// Edits the stored audit record `sequence`: `from` becomes `to` inside its bytes (one
/// byte flipped).
fn tamper_with_audit_record(store_dir: &Path, sequence: u64, from: &[u8], to: &[u8]) {
    let key = credvault::store::log_key(credvault::audit::PREFIX, sequence);
    rewrite_audit_records(store_dir, |rows| {
        let (key, mut value) = rows
            .into_iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("no audit record {sequence} in the store"));
        let at = value
            .windows(from.len())
            .position(|w| w == from)
            .unwrap_or_else(|| panic!("record {sequence} does not hold {from:?}"));
        value[at..at + to.len()].copy_from_slice(to);
        let mut batch = credvault::store::Batch::default();
        batch.put(key, value);
        batch
    });
}

#[test]
fn audit_query_tail_export_and_verify_online_and_offline_detect_an_edited_record() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut server = Server::dev(tmp.path(), &[]);
    let certs = tmp.path().join("certs");

    // Three decisions about acme's credential: a seal, an unseal with a purpose, and a Seal
    // by an executor certificate, which the policy denies.
    run(
        server
            .client("seal")
            .args(["--tenant", "acme", "--id", "gmail/alice"]),
        b"SID=abc",
    )
    .assert_success("seal");
    let unsealed = run(
        server.client("unseal").args([
            "--tenant",
            "acme",
            "--id",
            "gmail/alice",
            "--purpose",
            "task-42",
        ]),
        b"",
    );
    assert_eq!(unsealed.assert_success("unseal").stdout, b"SID=abc");
    let denied = run(
        server
            .client("seal")
            .args(["--tenant", "acme", "--id", "gmail/alice"])
            .arg("--cert")
            .arg(certs.join("executor.pem"))
            .arg("--key")
            .arg(certs.join("executor.key")),
        b"forged",
    );
    denied.assert_failure("seal with the executor certificate");
    assert!(
        denied.stderr.contains("PERMISSION_DENIED"),
        "{}",
        denied.stderr
    );

    // `query --tenant`: exactly those three, in order, never the secret.
    let queried = audit(&server, "query", &["--tenant", "acme"]);
    let records = json_lines(queried.assert_success("audit query --tenant acme"));
    assert!(
        !contains(&queried.stdout, b"SID=abc"),
        "a secret in the audit log"
    );
    assert!(
        !contains(&queried.stdout, b"forged"),
        "a secret in the audit log"
    );
    let fields: Vec<_> = records.iter().map(record_fields).collect();
    assert_eq!(
        fields,
        [
            (
                "Seal",
                "spiffe://credvault/ingest/dev",
                "ok",
                "",
                "gmail/alice",
                1
            ),
            (
                "Unseal",
                "spiffe://credvault/executor/dev",
                "ok",
                "task-42",
                "gmail/alice",
                1
            ),
            (
                "Seal",
                "spiffe://credvault/executor/dev",
                "PERMISSION_DENIED",
                "",
                "gmail/alice",
                0
            ),
        ],
        "{records:?}"
    );
    for record in &records {
        assert_eq!(record["tenant_id"], "acme", "{record}");
        assert_eq!(record["mac"].as_str().map(str::len), Some(64), "{record}");
        assert!(record["at_ms"].as_u64().unwrap_or(0) > 0, "{record}");
    }
    let seqs = sequences(&records);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let unseal_seq = seqs[1];
    let unseal_at = records[1]["at_ms"].as_u64().expect("at_ms");

    // The other filters; --from and --to take milliseconds or RFC 3339.
    let only = |args: &[&str]| {
        let output = audit(&server, "query", args);
        sequences(&json_lines(output.assert_success("audit query")))
    };
    assert_eq!(
        only(&["--tenant", "acme", "--outcome", "PERMISSION_DENIED"]),
        [seqs[2]]
    );
    assert_eq!(
        only(&[
            "--caller",
            "spiffe://credvault/executor/dev",
            "--tenant",
            "acme"
        ]),
        [seqs[1], seqs[2]]
    );
    assert_eq!(
        only(&["--credential", "gmail/alice", "--outcome", "ok"]),
        [seqs[0], seqs[1]]
    );
    assert_eq!(
        only(&[
            "--credential",
            "gmail/alice",
            "--from",
            &unseal_at.to_string(),
            "--to",
            &(unseal_at + 1).to_string()
        ]),
        [unseal_seq]
    );
    assert_eq!(
        only(&["--tenant", "acme", "--to", "2000-01-01T00:00:00Z"]),
        Vec::<u64>::new()
    );
    assert_eq!(
        only(&["--credential", "gmail/alice", "--limit", "1"]),
        [seqs[0]]
    );
    let bad_time = audit(&server, "query", &["--from", "yesterday"]);
    assert_eq!(bad_time.status.code(), Some(2), "{}", bad_time.stderr); // a usage error
    assert!(bad_time.stderr.contains("RFC 3339"), "{}", bad_time.stderr);
    // An executor may not read the audit log: the server's refusal is an error line.
    let refused = run(
        server
            .command(&["audit", "query"])
            .arg("--cert")
            .arg(certs.join("executor.pem"))
            .arg("--key")
            .arg(certs.join("executor.key")),
        b"",
    );
    refused.assert_failure("audit query by an executor");
    assert!(
        refused
            .stderr
            .contains("PermissionDenied PERMISSION_DENIED"),
        "{}",
        refused.stderr
    );

    // `export`: every record, from 1, without gaps; `--after` starts later.
    let exported = json_lines(audit(&server, "export", &[]).assert_success("audit export"));
    let exported_seqs = sequences(&exported);
    let count = exported.len() as u64;
    assert_eq!(exported_seqs, (1..=count).collect::<Vec<_>>());
    assert!(exported.contains(&records[1]), "{exported:?}");
    let after = json_lines(
        audit(&server, "export", &["--after", &unseal_seq.to_string()])
            .assert_success("audit export --after"),
    );
    assert_eq!(sequences(&after)[0], unseal_seq + 1);

    // `verify` online: the export's own QueryAudit is one more record.
    let verified = audit(&server, "verify", &[]);
    verified.assert_success("audit verify");
    assert_eq!(verified_count(&verified.stdout_text()), count + 2); // + export, + export --after
    let (head, head_seq) = printed_head(&verified);
    assert_eq!(head_seq, count + 2, "{}", verified.stdout_text());

    // `tail -n 2`: the two newest, the VerifyAudit last; not tail's own probing calls.
    let tailed = json_lines(audit(&server, "tail", &["-n", "2"]).assert_success("audit tail"));
    let newest = count + 3;
    assert_eq!(sequences(&tailed), [newest - 1, newest], "{tailed:?}");
    assert_eq!(tailed[1]["rpc"], "VerifyAudit", "{tailed:?}");
    assert_eq!(tailed[0]["rpc"], "QueryAudit", "{tailed:?}");
    let all = json_lines(audit(&server, "export", &[]).assert_success("audit export"));
    assert_eq!(&all[(newest - 2) as usize..newest as usize], &tailed[..]);

    // The head `verify` printed, verified against: matched. A malformed head is an
    // error (exit 1), not a broken chain (exit 2).
    let against = audit(&server, "verify", &["--seen", &head]);
    against.assert_success("audit verify --seen");
    assert!(
        against
            .stdout_text()
            .contains(&format!("head seen {head_seq}: matched\n")),
        "{}",
        against.stdout_text()
    );
    audit(&server, "verify", &["--seen", "12:beef"]).assert_failure("audit verify --seen 12:beef");

    // `tail --follow`: the newest record, then each new one as it comes, and never its own
    // polls; SIGTERM ends it with status 0.
    let mut follower = Streaming::follow_audit(&server, &["-n", "1"]);
    let first = follower.next("the newest record");
    let start = first["sequence"].as_u64().expect("sequence");
    run(
        server.client("unseal").args([
            "--tenant",
            "acme",
            "--id",
            "gmail/alice",
            "--purpose",
            "followed",
        ]),
        b"",
    )
    .assert_success("unseal while following");
    let followed = follower.next("the followed unseal");
    assert_eq!(
        record_fields(&followed),
        (
            "Unseal",
            "spiffe://credvault/executor/dev",
            "ok",
            "followed",
            "gmail/alice",
            1
        )
    );
    assert!(followed["sequence"].as_u64().unwrap_or(0) > start);
    // A few polls with nothing new: nothing printed.
    thread::sleep(Duration::from_millis(1500));
    let (status, stderr, rest) = follower.terminate();
    assert_eq!(status.code(), Some(0), "{status}: {stderr}");
    assert!(
        rest.is_empty(),
        "tail --follow printed its own polls: {rest:?}"
    );

    // Offline while the server runs: refused, saying why.
    let locked = verify_offline(tmp.path());
    locked.assert_failure("offline verify of a running server's store");
    assert!(
        locked.stderr.contains("is the server still running"),
        "{}",
        locked.stderr
    );

    // Stopped and untampered: offline verify passes and counts what online verify saw.
    assert_eq!(
        server.terminate().code(),
        Some(0),
        "{}",
        server.stderr_text()
    );
    let clean = verify_offline(tmp.path());
    clean.assert_success("offline verify of an untampered store");
    assert!(
        verified_count(&clean.stdout_text()) > count + 2,
        "{}",
        clean.stdout_text()
    );
    // The server logged its last head as it stopped: the newest record, which the
    // store holds.
    let logged = strip_ansi(&server.stderr_text());
    let last_head = logged
        .lines()
        .rev()
        .filter(|line| line.contains("audit head"))
        .filter_map(|line| line.split("head=").nth(1))
        .find_map(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `audit head` line: {logged}"))
        .to_owned();
    let (_, last_seq) = printed_head(&clean);
    assert!(
        last_head.starts_with(&format!("{last_seq}:")),
        "{last_head} / {last_seq}"
    );
    let mut against = verify_offline_command(tmp.path());
    let matched = run(against.args(["--seen", &last_head]), b"");
    matched.assert_success("offline verify --seen the logged head");
    assert!(
        matched.stdout_text().contains(": matched\n"),
        "{}",
        matched.stdout_text()
    );

    // The newest records cut off: the chain alone still verifies, the head kept does not.
    cut_audit_records_from(&tmp.path().join("data/store"), head_seq - 1);
    let cut = verify_offline(tmp.path());
    cut.assert_success("offline verify of a cut log, without a head");
    assert_eq!(verified_count(&cut.stdout_text()), head_seq - 2);
    let mut against = verify_offline_command(tmp.path());
    let caught = run(against.args(["--seen", &head]), b"");
    assert_eq!(caught.status.code(), Some(2), "{}", caught.stderr);
    let text = caught.stdout_text();
    assert!(
        text.contains(&format!(
            "audit chain BROKEN at sequence {}\n",
            head_seq - 1
        )),
        "{text}"
    );
    assert!(text.contains("cut off"), "{text}");

    // One byte of the unseal's record flipped: the purpose now reads task-43.
    tamper_with_audit_record(
        &tmp.path().join("data/store"),
        unseal_seq,
        b"task-42",
        b"task-43",
    );
    let broken = verify_offline(tmp.path());
    assert_eq!(broken.status.code(), Some(2), "{}", broken.stderr);
    let text = broken.stdout_text();
    assert!(
        text.contains(&format!("audit chain BROKEN at sequence {unseal_seq}\n")),
        "{text}"
    );
    assert!(text.contains("reason: "), "{text}");

    // The server restarted on the edited store says the same online.
    let server = Server::dev(tmp.path(), &[]);
    let broken = audit(&server, "verify", &[]);
    assert_eq!(broken.status.code(), Some(2), "{}", broken.stderr);
    assert!(
        broken
            .stdout_text()
            .contains(&format!("audit chain BROKEN at sequence {unseal_seq}\n")),
        "{}",
        broken.stdout_text()
    );
}

/// Every file under `dir`, by its path relative to `dir`, with its bytes.
fn files_under(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, into: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
        for entry in fs::read_dir(dir).expect("reading a directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(root, &path, into);
            } else {
                let relative = path.strip_prefix(root).expect("under root").to_path_buf();
                into.insert(relative, fs::read(&path).expect("reading a file"));
            }
        }
    }
    let mut files = std::collections::BTreeMap::new();
    walk(dir, dir, &mut files);
    files
}

#[test]
fn offline_verify_and_export_after_kill_9_read_a_copy_and_leave_the_data_directory_as_it_was() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let server = Server::dev(tmp.path(), &[]);
    run(
        server
            .client("seal")
            .args(["--tenant", "acme", "--id", "gmail/alice"]),
        b"SID=abc",
    )
    .assert_success("seal");
    for _ in 0..3 {
        assert_eq!(server.unsealed("acme", "gmail/alice", "unseal"), b"SID=abc");
    }
    // SIGKILL: the store's log holds writes its tree lacks, and the journal may hold
    // records the log lacks; opening the store in place would apply both.
    drop(server);
    let store = tmp.path().join("data/store");
    let before = files_under(&store);
    let scratch = tmp.path().join("scratch");
    fs::create_dir(&scratch).expect("scratch dir");

    let mut command = verify_offline_command(tmp.path());
    let verified = run(command.arg("--scratch").arg(&scratch), b"");
    verified.assert_success("offline verify after kill -9");
    let text = verified.stdout_text();
    // The seal, the three unseals and the dev server's own records at least.
    let count = verified_count(&text);
    assert!(count >= 4, "{text}");
    assert!(
        verified.stderr.contains("is not written"),
        "{}",
        verified.stderr
    );

    // `export --data-dir`: every record of the copy, as the online export prints them.
    let mut command = offline_audit_command(tmp.path(), "export", &store);
    let exported = run(command.arg("--scratch").arg(&scratch), b"");
    let records = json_lines(exported.assert_success("offline export after kill -9"));
    assert_eq!(sequences(&records), (1..=count).collect::<Vec<_>>());
    let unseals = records
        .iter()
        .filter(|r| r["rpc"] == "Unseal" && r["outcome"] == "ok")
        .filter(|r| r["tenant_id"] == "acme" && r["credential_id"] == "gmail/alice")
        .count();
    assert_eq!(unseals, 3, "{records:?}");
    assert!(
        !contains(&exported.stdout, b"SID=abc"),
        "a secret in the export"
    );

    let after = files_under(&store);
    let changed: std::collections::BTreeSet<_> = before
        .keys()
        .chain(after.keys())
        .filter(|path| before.get(*path) != after.get(*path))
        .collect();
    assert!(changed.is_empty(), "offline verify changed {changed:?}");
    assert_eq!(
        fs::read_dir(&scratch).expect("scratch dir").count(),
        0,
        "the copy was left behind"
    );

    // The same again: the same records (nothing was appended to the original).
    let again = verify_offline(tmp.path());
    again.assert_success("second offline verify");
    assert_eq!(verified_count(&again.stdout_text()), count);

    // The server starts on the untouched directory and serves what it acknowledged.
    let server = Server::dev(tmp.path(), &[]);
    assert_eq!(
        server.unsealed("acme", "gmail/alice", "unseal after restart"),
        b"SID=abc"
    );
    let online = audit(&server, "verify", &[]);
    online.assert_success("audit verify after restart");
    assert!(verified_count(&online.stdout_text()) > count);

    // A directory that holds no store is refused, and nothing is created there.
    let typo = tmp.path().join("data/stor");
    let refused = run(&mut offline_audit_command(tmp.path(), "verify", &typo), b"");
    refused.assert_failure("offline verify of a directory without a store");
    assert!(
        refused.stderr.contains("holds no credvault store"),
        "{}",
        refused.stderr
    );
    assert!(!typo.exists());
}

#[test]
fn audit_retention_is_validated_and_prunes_old_records_keeping_the_chain_verifiable() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let good = serve_setup(tmp.path());

    let bad = tmp.path().join("bad.toml");
    fs::write(&bad, format!("{good}\n[audit]\nretention = \"nonsense\"\n")).unwrap();
    let refused = run(credvault().arg("serve").arg("--config").arg(&bad), b"");
    refused.assert_failure("serve with audit.retention = nonsense");
    assert!(
        refused.stderr.contains("config field `audit.retention`"),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("nonsense"), "{}", refused.stderr);

    // A one-second retention, checked every second: old records go, the chain still verifies.
    let config = tmp.path().join("credvault.toml");
    fs::write(
        &config,
        format!("{good}\n[rotation]\ncheck_interval = \"1s\"\n\n[audit]\nretention = \"1s\"\n"),
    )
    .unwrap();
    let server = Server::start(tmp.path(), |port| {
        let mut command = credvault();
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        command
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    let oldest = loop {
        let exported = json_lines(audit(&server, "export", &[]).assert_success("audit export"));
        let oldest = exported[0]["sequence"].as_u64().expect("sequence");
        if oldest > 1 {
            break oldest;
        }
        assert!(
            Instant::now() < deadline,
            "no audit record pruned within {READY_TIMEOUT:?}\n{}",
            server.stderr_text()
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert!(oldest > 1);
    let verified = audit(&server, "verify", &[]);
    verified.assert_success("audit verify after pruning");
    assert!(verified.stdout_text().starts_with("audit chain ok: "));
    assert!(
        strip_ansi(&server.stderr_text()).contains("old audit records pruned"),
        "{}",
        server.stderr_text()
    );
}

// ---------------------------------------------------------------------------------------------
// Backup and restore

/// `credvault restore --from FROM --root-key-file KEY` and then `tail` (`--check`, or
/// `--data-dir DIR`).
fn restore(from: &Path, key: &Path, tail: &[&std::ffi::OsStr]) -> Output {
    run(
        credvault()
            .args(["restore", "--from"])
            .arg(from)
            .arg("--root-key-file")
            .arg(key)
            .args(tail),
        b"",
    )
}

#[test]
fn backup_and_restore_through_the_binary() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let mut server = Server::dev(dir, &[]);
    let unseal = |server: &Server, id: &str| {
        run(
            server
                .client("unseal")
                .args(["--tenant", "acme", "--id", id]),
            b"",
        )
    };

    // Three secrets, one of them with two versions, binary bytes included.
    let secrets: [(&str, &[u8]); 3] = [
        ("gmail", b"SID=31d4d96e; HSID=\xff\xfe\x00\x80 end\n"),
        ("openai", b"sk-test-4f1c2a9e8b7d6c5a"),
        ("github", b"ghp_\x00\x01\x02 token"),
    ];
    run(
        server
            .client("seal")
            .args(["--tenant", "acme", "--id", "gmail"]),
        b"version 1, replaced by version 2",
    )
    .assert_success("seal gmail v1");
    for (id, secret) in secrets {
        run(
            server.client("seal").args(["--tenant", "acme", "--id", id]),
            secret,
        )
        .assert_success(id);
    }

    // The backup: written on the server's host, where the command says, owner only.
    let backup_dir = dir.join("b");
    let backup_file = backup_dir.join("credvault.backup");
    let written = run(server.client("backup").arg(&backup_dir), b"");
    let report = written.assert_success("backup").stdout_text();
    let bytes = fs::metadata(&backup_file)
        .unwrap_or_else(|e| panic!("{}: {e}\n{report}", backup_file.display()))
        .len();
    assert!(
        report.contains(&format!(
            "backup written: {} ({bytes} bytes)",
            backup_file.display()
        )),
        "{report}"
    );
    assert!(report.contains("root key v1"), "{report}");
    assert_eq!(mode(&backup_file), PRIVATE_MODE);
    assert_eq!(
        fs::read_dir(&backup_dir).unwrap().count(),
        1,
        "only the backup file is left in {}",
        backup_dir.display()
    );
    // `records N (+M written while it ran)`, to be found again when it is read back.
    let records = report
        .lines()
        .find_map(|line| {
            let line = line.trim();
            line.starts_with("records ")
                .then(|| line.split_once(", root key").map_or(line, |(head, _)| head))
        })
        .unwrap_or_else(|| panic!("no `records` line: {report}"))
        .to_owned();
    assert!(records.ends_with("written while it ran)"), "{records}");

    // Again into the same directory, named relatively this time: refused, the file unchanged.
    let backup_bytes = fs::read(&backup_file).unwrap();
    let refused = run(server.client("backup").arg("b").current_dir(dir), b"");
    refused.assert_failure("backup into a non-empty directory");
    assert!(
        refused.stderr.contains("BACKUP_DIRECTORY_NOT_EMPTY"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains(&backup_dir.display().to_string()),
        "the relative directory was not made absolute: {}",
        refused.stderr
    );
    assert!(refused.stdout.is_empty(), "{}", refused.stdout_text());
    assert_eq!(fs::read(&backup_file).unwrap(), backup_bytes);

    // Written after the backup: not in it.
    run(
        server
            .client("seal")
            .args(["--tenant", "acme", "--id", "later"]),
        b"sealed after the backup",
    )
    .assert_success("seal after the backup");
    assert!(server.terminate().success(), "{}", server.stderr_text());
    drop(server);

    // --check: intact, the same counts, and nothing written.
    let root_key = dir.join("data/root.key");
    let entries = || {
        let mut paths: Vec<PathBuf> = [dir, backup_dir.as_path()]
            .into_iter()
            .flat_map(|d| fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
            .collect();
        paths.sort();
        paths
    };
    let before = entries();
    let checked = restore(&backup_dir, &root_key, &["--check".as_ref()]);
    let check = checked.assert_success("restore --check").stdout_text();
    assert!(
        check.contains(&format!(
            "backup intact: {} ({bytes} bytes",
            backup_file.display()
        )),
        "{check}"
    );
    assert!(check.contains(&records), "{check} lacks {records:?}");
    assert_eq!(before, entries(), "restore --check wrote something");

    // Restore into a new data directory: the audit chain of the result verifies.
    let restored = dir.join("restored");
    let output = restore(
        &backup_file,
        &root_key,
        &["--data-dir".as_ref(), restored.as_os_str()],
    );
    let text = output.assert_success("restore --data-dir").stdout_text();
    assert!(
        text.contains(&format!("restored: {}", backup_file.display())),
        "{text}"
    );
    assert!(text.contains(&records), "{text} lacks {records:?}");
    assert!(
        text.contains(&format!("into {}", restored.display())),
        "{text}"
    );
    let audited = verified_count(&text);
    assert!(
        audited >= 4,
        "{audited} audit records for four seals: {text}"
    );
    assert!(restored.join("db").exists(), "{}", restored.display());

    // Restoring again into the same, now non-empty, directory is refused.
    let again = restore(
        &backup_file,
        &root_key,
        &["--data-dir".as_ref(), restored.as_os_str()],
    );
    again.assert_failure("restore into a non-empty directory");
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);

    // A server on the restored store: every secret as sealed, and nothing written after.
    let config = dir.join("restored.toml");
    fs::write(
        &config,
        serve_config(
            &restored,
            &root_key,
            &dir.join("data/policy.toml"),
            &dir.join("certs"),
        ),
    )
    .unwrap();
    let mut server = Server::start(dir, |port| {
        let mut command = credvault();
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        command
    });
    for (id, secret) in secrets {
        let unsealed = unseal(&server, id);
        assert_eq!(
            unsealed.assert_success(id).stdout,
            secret,
            "{id} after the restore"
        );
    }
    let first = run(
        server
            .client("unseal")
            .args(["--tenant", "acme", "--id", "gmail", "--version", "1"]),
        b"",
    );
    assert_eq!(
        first.assert_success("gmail v1").stdout,
        b"version 1, replaced by version 2"
    );
    let missing = unseal(&server, "later");
    missing.assert_failure("unseal of a secret sealed after the backup");
    assert!(missing.stderr.contains("NOT_FOUND"), "{}", missing.stderr);
    assert!(missing.stdout.is_empty(), "{}", missing.stdout_text());
    let listed = run(server.client("list").args(["--tenant", "acme"]), b"");
    let list = listed
        .assert_success("list after the restore")
        .stdout_text();
    assert_eq!(list.lines().count(), secrets.len(), "{list}");
    assert!(server.terminate().success(), "{}", server.stderr_text());
    drop(server);

    // One byte flipped in the middle of a copy: refused, no data directory left.
    let damaged = dir.join("damaged.backup");
    let mut copy = backup_bytes.clone();
    let middle = copy.len() / 2;
    copy[middle] ^= 0x01;
    fs::write(&damaged, &copy).unwrap();
    let bad = dir.join("bad");
    let refused = restore(
        &damaged,
        &root_key,
        &["--data-dir".as_ref(), bad.as_os_str()],
    );
    refused.assert_failure("restore of a damaged backup");
    assert!(
        refused.stderr.contains("not an intact credvault backup"),
        "{}",
        refused.stderr
    );
    assert!(refused.stdout.is_empty(), "{}", refused.stdout_text());
    assert!(!bad.exists(), "{} left behind", bad.display());
    let refused = restore(&damaged, &root_key, &["--check".as_ref()]);
    refused.assert_failure("restore --check of a damaged backup");
    assert!(
        refused.stderr.contains("not an intact credvault backup"),
        "{}",
        refused.stderr
    );

    // Another root key does not open it: the message names the version it needs.
    let other_key = dir.join("other.key");
    run(credvault().arg("keygen").arg("--out").arg(&other_key), b"").assert_success("keygen");
    let wrong = dir.join("wrong");
    let refused = restore(
        &backup_dir,
        &other_key,
        &["--data-dir".as_ref(), wrong.as_os_str()],
    );
    refused.assert_failure("restore under another root key");
    assert!(refused.stderr.contains("root key v1"), "{}", refused.stderr);
    assert!(!wrong.exists(), "{} left behind", wrong.display());
}
