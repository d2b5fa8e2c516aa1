//! TLS on the bus, as an option: the files `scripts/make-ca.sh` makes (a
//! local CA, a server certificate and a client certificate), what a server
//! started here does with them ([`TlsFiles::server`]: TLS required, and with
//! mutual TLS a client certificate signed by the CA too) and what every
//! client is given ([`TlsFiles::client`], the nats CLI's `--tlsca`,
//! `--tlscert`, `--tlskey`; `NATS_CA`, `NATS_CERT`, `NATS_KEY` for the
//! services). NKey credentials stay as they are: TLS protects the
//! connection, the NKey says who is on it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use twopc_common::nats::AuthArgs;

use crate::process::ServerTls;

/// The script that makes the files, built into the binary so that `twopc
/// up --tls` works wherever it is installed (the same text as
/// `scripts/make-ca.sh`).
pub const MAKE_CA_SCRIPT: &str = include_str!("../../scripts/make-ca.sh");

/// The files of a local CA, as `scripts/make-ca.sh DIR` names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate: servers verify client certificates against it,
    /// clients the server's.
    pub ca: PathBuf,
    /// The server's certificate (127.0.0.1, localhost, and the compose
    /// host names) and key; cluster nodes present it on routes too.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The client certificate every twopc client presents (mutual TLS).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// The files in `dir` (whether or not they exist yet).
    pub fn in_dir(dir: &Path) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }

    /// The files in `dir`, made first by [`MAKE_CA_SCRIPT`] (which keeps
    /// fresh ones). Needs `openssl` ([`openssl_available`]).
    pub fn make(dir: &Path) -> anyhow::Result<Self> {
        if let Err(why) = openssl_available() {
            bail!("cannot make TLS certificates in {}: {why}", dir.display());
        }
        let out = Command::new("bash")
            .arg("-c")
            .arg(MAKE_CA_SCRIPT)
            .arg("make-ca.sh")
            .arg(dir)
            .output()
            .context("running bash for scripts/make-ca.sh")?;
        if !out.status.success() {
            bail!(
                "scripts/make-ca.sh {} failed ({}): {}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let files = TlsFiles::in_dir(dir);
        files.check()?;
        Ok(files)
    }

    /// The files in `dir` for a system to use: made, or kept, or renewed
    /// when near their end, by [`TlsFiles::make`]; without openssl, those
    /// there if none is missing.
    pub fn ensure(dir: &Path) -> anyhow::Result<Self> {
        let files = TlsFiles::in_dir(dir);
        if openssl_available().is_err() && files.check().is_ok() {
            return Ok(files);
        }
        TlsFiles::make(dir)
    }

    /// Refuses a set with a missing file (naming it and the script).
    pub fn check(&self) -> anyhow::Result<()> {
        for f in [
            &self.ca,
            &self.server_cert,
            &self.server_key,
            &self.client_cert,
            &self.client_key,
        ] {
            if !f.is_file() {
                bail!(
                    "TLS file {} is missing (scripts/make-ca.sh DIR makes them)",
                    f.display()
                );
            }
        }
        Ok(())
    }

    /// A server's TLS: its certificate, the CA; with `verify`, every client
    /// must present a certificate signed by the CA (mutual TLS).
    pub fn server(&self, verify: bool) -> ServerTls {
        ServerTls {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            ca: self.ca.clone(),
            verify,
        }
    }

    /// `auth` with these files' client settings: trust the CA (TLS
    /// required) and present the client certificate.
    pub fn client(&self, mut auth: AuthArgs) -> AuthArgs {
        auth.tls_ca = Some(self.ca.clone());
        auth.tls_cert = Some(self.client_cert.clone());
        auth.tls_key = Some(self.client_key.clone());
        auth
    }

    /// The services' environment for these files: the variables the nats
    /// CLI reads and the services' `AuthArgs` take.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NATS_CA".into(), self.ca.display().to_string()),
            ("NATS_CERT".into(), self.client_cert.display().to_string()),
            ("NATS_KEY".into(), self.client_key.display().to_string()),
        ]
    }
}

/// Whether `openssl` runs here (the script needs it); why not otherwise.
pub fn openssl_available() -> Result<(), String> {
    match Command::new("openssl").arg("version").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("`openssl version` failed: {}", out.status)),
        Err(e) => Err(format!(
            "openssl not found ({e}): install it (Debian: apt-get install openssl)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_keep_their_nkey_and_get_every_tls_setting() {
        let files = TlsFiles::in_dir(Path::new("/tls"));
        let auth = files.client(AuthArgs::nkey_file("/creds/wallet.nk"));
        assert_eq!(auth.nkey.as_deref(), Some(Path::new("/creds/wallet.nk")));
        assert_eq!(auth.tls_ca.as_deref(), Some(Path::new("/tls/ca.pem")));
        assert_eq!(auth.tls_cert.as_deref(), Some(Path::new("/tls/client.pem")));
        assert_eq!(
            auth.tls_key.as_deref(),
            Some(Path::new("/tls/client-key.pem"))
        );
        let env = files.env();
        assert!(env.contains(&("NATS_CA".into(), "/tls/ca.pem".into())));
        assert!(env.contains(&("NATS_CERT".into(), "/tls/client.pem".into())));
        assert!(env.contains(&("NATS_KEY".into(), "/tls/client-key.pem".into())));
    }
}
