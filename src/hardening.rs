//! Process hardening at start-up: keep key material and plaintext out of core dumps.
//!
//! A crash must not write the process's memory (root key, KEKs, DEKs, unsealed secrets) to a
//! core file, and another process of the same user must not read it through ptrace or
//! `/proc/<pid>/mem`.

use std::io;

use rustix::process::{Resource, Rlimit, setrlimit};

/// Turns core dumps off for the rest of the process's life: RLIMIT_CORE soft and hard limits 0
/// (so the process cannot raise them again without privilege), and on Linux marks the process
/// not dumpable, which also stops same-user ptrace attachment and makes `/proc/<pid>/mem`
/// and friends owned by root.
///
/// Call it first thing in `main`, before any key is loaded. Calling it again is harmless.
pub fn harden_process() -> io::Result<()> {
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    #[cfg(target_os = "linux")]
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use rustix::process::getrlimit;

    use super::*;

    /// Set in the child process that [`hardening_takes_effect`] starts.
    const CHILD_ENV: &str = "CREDVAULT_HARDENING_TEST_CHILD";
    const CHILD_TEST: &str = "hardening::tests::child_hardens_itself";

    /// Hardening changes the whole process for good (a non-dumpable process's `/proc/self`
    /// files belong to root), so it runs in a child process: this test binary again, running
    /// only [`child_hardens_itself`].
    #[test]
    fn hardening_takes_effect() {
        let output = Command::new(std::env::current_exe().unwrap())
            .args([
                CHILD_TEST,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "child failed:\n{stdout}\n{stderr}");
        // Guard against the filter matching nothing, which would also succeed.
        assert!(
            stdout.contains("1 passed") && stdout.contains("child hardened"),
            "child did not run the check:\n{stdout}\n{stderr}"
        );
    }

    #[test]
    #[ignore = "runs only as the child process of hardening_takes_effect"]
    fn child_hardens_itself() {
        if std::env::var_os(CHILD_ENV).is_none() {
            // Run directly (`cargo test -- --ignored`): leave this test process alone.
            return;
        }
        harden_process().unwrap();
        let core = getrlimit(Resource::Core);
        assert_eq!(core.current, Some(0));
        assert_eq!(core.maximum, Some(0));
        #[cfg(target_os = "linux")]
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
        // A second call is harmless.
        harden_process().unwrap();
        assert_eq!(getrlimit(Resource::Core).current, Some(0));
        println!("child hardened");
    }
}
