//! `credvault certs`: the development PKI.

use std::path::PathBuf;

use clap::Subcommand;
use credvault::pki::{DevPkiPaths, DevRole, ensure_dev_pki};

/// The development PKI: a local CA and certificates for trying credvault on one machine.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// The `credvault certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a development CA, a server certificate for localhost and 127.0.0.1, and client
    /// certificates for the executor, ingest, settings and admin roles. Existing files are kept.
    Init {
        /// Directory for the certificates and keys (created mode 0700).
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

/// Runs `credvault certs …`.
pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Init { dir } => {
            let paths = ensure_dev_pki(&dir)?;
            print!("{}", report(&paths));
            Ok(())
        }
    }
}

/// What `certs init` prints: each file created or reused, then who the client certificates
/// name.
fn report(paths: &DevPkiPaths) -> String {
    let mut out = String::new();
    for file in paths.created() {
        out.push_str(&format!("created {}\n", file.display()));
    }
    for file in paths.reused() {
        out.push_str(&format!("reused  {}\n", file.display()));
    }
    out.push_str(&format!(
        "dev PKI in {} (for development only: never trust this CA elsewhere)\n",
        paths.dir().display()
    ));
    for role in DevRole::ALL {
        let (cert, key) = paths.client(role);
        out.push_str(&format!(
            "  {:<9} {} --cert {} --key {}\n",
            role.as_str(),
            role.identity(),
            cert.display(),
            key.display()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(subcommand)]
        certs: CertsCommand,
    }

    #[test]
    fn init_defaults_to_the_certs_directory() {
        let cli = TestCli::try_parse_from(["certs", "init"]).unwrap();
        let CertsCommand::Init { dir } = cli.certs;
        assert_eq!(dir, PathBuf::from("certs"));
        let cli = TestCli::try_parse_from(["certs", "init", "--dir", "/tmp/x"]).unwrap();
        let CertsCommand::Init { dir } = cli.certs;
        assert_eq!(dir, PathBuf::from("/tmp/x"));
        assert!(TestCli::try_parse_from(["certs", "init", "--bogus"]).is_err());
    }

    #[test]
    fn init_creates_then_reuses_and_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let init = || CertsArgs {
            command: CertsCommand::Init { dir: dir.clone() },
        };
        run(init()).unwrap();
        let first = report(&ensure_dev_pki(&dir).unwrap());
        assert!(!first.contains("created"), "{first}");
        assert_eq!(first.matches("reused ").count(), 12, "{first}");
        assert!(first.contains("spiffe://credvault/executor/dev"), "{first}");

        std::fs::remove_file(dir.join("admin.pem")).unwrap();
        let paths = ensure_dev_pki(&dir).unwrap();
        let second = report(&paths);
        assert!(
            second.contains(&format!("created {}", dir.join("admin.pem").display())),
            "{second}"
        );
        assert_eq!(second.matches("reused ").count(), 11, "{second}");
        run(init()).unwrap();
    }
}
