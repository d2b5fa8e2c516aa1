//! The `twopc` commands, one file per concern; `main.rs` only parses and
//! dispatches to them.

pub mod bench;
pub mod chaos;
pub mod ops;
pub mod seed;
pub mod sim;
pub mod up;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use twopc_launcher::client::Reply;

/// Which credentials a command connects with: those given (`--nkey`,
/// `--creds`, `NATS_NKEY`, ...), else the identity's seed in `dir` when
/// `twopc up` made one there, else none.
pub struct Identities {
    pub explicit: twopc_common::nats::AuthArgs,
    pub dir: PathBuf,
}

impl Identities {
    /// How identity `name` (`admin`, a client) connects.
    pub fn auth(&self, name: &str) -> twopc_common::nats::AuthArgs {
        let mut auth = self.explicit.clone();
        if auth.nkey.is_none() && auth.creds.is_none() {
            let seed = self.dir.join(format!("{name}.nk"));
            if seed.exists() {
                auth.nkey = Some(seed);
            }
        }
        auth
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("bad duration unit in {s:?} (use s, m or h)")),
    };
    Ok(Duration::from_secs(secs))
}

pub fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialises"));
}

/// Prints a reply; an error reply makes the command fail.
pub fn print_reply<T: serde::Serialize>(r: Reply<T>) -> anyhow::Result<()> {
    match r {
        Reply::Ok(v) => {
            print_json(&v);
            Ok(())
        }
        Reply::Err(e) => {
            print_json(&e);
            bail!("{}: {}", e.error.code, e.error.message)
        }
    }
}
