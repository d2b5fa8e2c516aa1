//! What the KV decision log needs of a key-value store and of its
//! environment, as one seam: JetStream KV in the service
//! ([`super::nats::NatsKv`]), an in-memory stand-in that loses answers,
//! lands writes late and reads from deposed leaders in the simulation
//! (`twopc-sim`). The log's logic — claims, first-writer-wins records,
//! re-reads after unknown answers, compare-and-set, collection — is written
//! once, in [`super::KvLog`], over this trait, so production and simulation
//! run the same code.
//!
//! Time and randomness come through here too: the log never reads the wall
//! clock, the monotonic clock or a random source of its own.

use std::future::Future;

use bytes::Bytes;

/// How a put-if-absent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Create {
    /// This call's value was written.
    Written,
    /// Another value is there (the winner's), or another write to the key
    /// was in flight.
    Lost,
    /// The store did not say (timeout, connection lost, no quorum): the
    /// write may still land.
    Unknown(String),
}

/// How a compare-and-set ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// This call's value was written.
    Written,
    /// The key is not at the revision given any more.
    WrongRevision,
    /// The store did not say: the write may still land.
    Unknown(String),
    /// The store refused for another reason.
    Failed(String),
}

/// A value with the revision it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Bytes,
    pub revision: u64,
}

/// A key-value store with first-writer-wins creates and compare-and-set
/// updates, and the clocks and randomness of the process using it.
pub trait KvStore: Clone + Send + Sync + 'static {
    /// Put-if-absent.
    fn create(&self, key: &str, value: Bytes) -> impl Future<Output = Create> + Send;
    /// Compare-and-set on `revision`.
    fn update(&self, key: &str, value: Bytes, revision: u64)
        -> impl Future<Output = Update> + Send;
    /// The latest value of `key`, read where writes are ordered (the stream
    /// leader), or `None` when there is none or it was deleted.
    fn latest(&self, key: &str) -> impl Future<Output = Result<Option<Entry>, String>> + Send;
    /// Deletes `key` if it is still at `revision`; false if it is not.
    fn delete_at(
        &self,
        key: &str,
        revision: u64,
    ) -> impl Future<Output = Result<bool, String>> + Send;
    /// The latest value of every key starting with `prefix` that `keep`
    /// accepts (the rest are dropped as they stream by, not held).
    fn scan(
        &self,
        prefix: &str,
        keep: &(dyn Fn(&Entry) -> bool + Sync),
    ) -> impl Future<Output = Result<Vec<Entry>, String>> + Send;

    /// Wall-clock time in milliseconds since the epoch (stamps in records).
    fn now_ms(&self) -> i64;
    /// A monotonic clock in milliseconds (deadlines and waits).
    fn monotonic_ms(&self) -> u64;
    /// Waits `ms` milliseconds.
    fn sleep(&self, ms: u64) -> impl Future<Output = ()> + Send;
    /// A random number (writer ids).
    fn random(&self) -> u64;
}
