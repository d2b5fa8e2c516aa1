//! Who owns a participant name: the lease every participant instance reads
//! and writes in the JetStream KV bucket [`crate::subjects::OWNER_BUCKET`],
//! key = the participant's name (`wallet`, `order`).
//!
//! JSON, so that an operator can read it with `nats kv get twopc_owners
//! wallet`. The participant library (`twopc_participant::ownership`) holds
//! the rules; this is only the value's shape and its limits.

use serde::{Deserialize, Serialize};

/// Largest lease value read back; anything longer is refused as corrupt.
pub const MAX_LEASE_BYTES: usize = 4096;

/// The value under a participant's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// The data store that is this participant: a UUID made once when its
    /// SQLite database was created, kept in the database. Bound by the
    /// first owner and never changed but on purpose (`--replace-store`):
    /// another store under the same name would be a second, different
    /// wallet.
    pub store: String,
    /// Raised by one at every takeover; the owner's fencing token. The
    /// store's database keeps the highest epoch that took it, and refuses
    /// writes from any other.
    pub epoch: u64,
    /// The live owner, or `None` once it let go (a clean shutdown).
    pub owner: Option<Holder>,
}

/// One participant process holding the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holder {
    /// A UUIDv7 made at the process's start.
    pub instance: String,
    pub host: String,
    pub pid: u32,
    /// The data folder, absolute.
    pub data_dir: String,
    /// Whether it holds the data folder's lock file, which the operating
    /// system lets go of when the process dies: a successor on the same
    /// host and folder that gets the lock knows this holder is dead.
    pub locked: bool,
    /// How long the lease lasts without a renewal, in ms.
    pub lease_ms: u64,
    /// Wall-clock time of the takeover (for people; no rule reads it).
    pub since_ms: i64,
    /// Renewals so far: every renewal changes the value, so a standby sees
    /// the revision move while the owner lives.
    pub renewals: u64,
}

impl Lease {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a lease serialises")
    }

    /// Parses a value read from the bucket.
    pub fn parse(bytes: &[u8]) -> Result<Lease, String> {
        if bytes.len() > MAX_LEASE_BYTES {
            return Err(format!(
                "lease value of {} bytes (at most {MAX_LEASE_BYTES})",
                bytes.len()
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("lease value does not parse: {e}"))
    }
}

/// On a server without JetStream, what an instance says of itself on
/// `twopc.<name>.owner`: both the question (the asker) and each answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerPing {
    pub instance: String,
    pub store: String,
    /// Serving (the owner), or still a candidate.
    pub serving: bool,
    pub host: String,
    pub pid: u32,
    pub data_dir: String,
}

impl OwnerPing {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a ping serialises")
    }

    pub fn parse(bytes: &[u8]) -> Result<OwnerPing, String> {
        if bytes.len() > MAX_LEASE_BYTES {
            return Err(format!("owner ping of {} bytes", bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("owner ping does not parse: {e}"))
    }
}

impl std::fmt::Display for OwnerPing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "instance {} (pid {} on {}, data {})",
            self.instance, self.pid, self.host, self.data_dir
        )
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "instance {} (pid {} on {}, data {})",
            self.instance, self.pid, self.host, self.data_dir
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_reads_back_and_junk_is_refused() {
        let lease = Lease {
            store: "0190-store".into(),
            epoch: 3,
            owner: Some(Holder {
                instance: "0190-inst".into(),
                host: "h".into(),
                pid: 7,
                data_dir: "/d".into(),
                locked: true,
                lease_ms: 5000,
                since_ms: 1,
                renewals: 2,
            }),
        };
        assert_eq!(Lease::parse(&lease.to_json()).unwrap(), lease);
        let released = Lease {
            owner: None,
            ..lease
        };
        assert_eq!(Lease::parse(&released.to_json()).unwrap(), released);
        assert!(Lease::parse(b"{}").is_err());
        assert!(Lease::parse(b"not json").is_err());
        assert!(Lease::parse(&vec![b' '; MAX_LEASE_BYTES + 1]).is_err());
        assert!(Lease::parse(br#"{"store":"s","epoch":1,"owner":null,"x":1}"#).is_err());
    }
}
