//! [`KvStore`] over JetStream KV (async-nats), with the process's own
//! clocks and randomness.

use std::time::Duration;

use async_nats::jetstream::{self, kv, ErrorCode};
use bytes::Bytes;
use futures::StreamExt;

use super::store::{Create, Entry, KvStore, Update};

/// How long the marker a deletion leaves behind lives (the smallest
/// per-message TTL JetStream takes).
pub(super) const MARKER_TTL: Duration = Duration::from_secs(1);

/// A JetStream KV bucket.
#[derive(Clone)]
pub struct NatsKv {
    pub(super) kv: kv::Store,
    client: async_nats::Client,
    /// `$KV.<bucket>.` — the stream subject prefix of keys.
    subject_prefix: String,
    /// Origin of [`KvStore::monotonic_ms`].
    started: tokio::time::Instant,
}

impl NatsKv {
    pub fn new(kv: kv::Store, client: async_nats::Client, bucket: &str) -> Self {
        NatsKv {
            kv,
            client,
            subject_prefix: format!("$KV.{bucket}."),
            started: tokio::time::Instant::now(),
        }
    }
}

/// The JetStream error code somewhere in `e`'s chain of sources, if any.
fn js_code(e: &(dyn std::error::Error + 'static)) -> Option<ErrorCode> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(js) = err.downcast_ref::<jetstream::Error>() {
            return Some(js.error_code());
        }
        cur = err.source();
    }
    None
}

impl KvStore for NatsKv {
    async fn create(&self, key: &str, value: Bytes) -> Create {
        match self.kv.create(key, value).await {
            Ok(_) => Create::Written,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Create::Lost,
            // A replicated stream refuses a write to a key with another
            // write to it in flight (10164); async-nats files it as Other.
            Err(e) if js_code(&e) == Some(ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT) => {
                Create::Lost
            }
            Err(e) => Create::Unknown(e.to_string()),
        }
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Update {
        match self.kv.update(key, value, revision).await {
            Ok(_) => Update::Written,
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Update::WrongRevision,
            Err(e) if js_code(&e) == Some(ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT) => {
                Update::WrongRevision
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::TimedOut => Update::Unknown(e.to_string()),
            Err(e) => Update::Failed(e.to_string()),
        }
    }

    async fn latest(&self, key: &str) -> Result<Option<Entry>, String> {
        match twopc_common::nats::kv_latest(&self.kv, key).await {
            Ok(v) => Ok(v.map(|(value, revision)| Entry {
                key: key.to_owned(),
                value,
                revision,
            })),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn delete_at(&self, key: &str, revision: u64) -> Result<bool, String> {
        match self
            .kv
            .purge_expect_revision_with_ttl(key, revision, MARKER_TTL)
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) if js_code(&e) == Some(ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT) => {
                Ok(false)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// One pass with an ordered consumer over the keys' last values.
    async fn scan(
        &self,
        prefix: &str,
        keep: &(dyn Fn(&Entry) -> bool + Sync),
    ) -> Result<Vec<Entry>, String> {
        let mut out = vec![];
        let consumer = self
            .kv
            .stream
            .create_consumer(jetstream::consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: format!("{}{prefix}>", self.subject_prefix),
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                replay_policy: jetstream::consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| e.to_string())?;
            let info = m.info().map_err(|e| e.to_string())?;
            let (pending, revision) = (info.pending, info.stream_sequence);
            let deleted = m
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some();
            if !deleted {
                let key = m
                    .subject
                    .as_str()
                    .strip_prefix(&self.subject_prefix)
                    .unwrap_or_default()
                    .to_owned();
                let entry = Entry {
                    key,
                    value: m.payload.clone(),
                    revision,
                };
                if keep(&entry) {
                    out.push(entry);
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    fn now_ms(&self) -> i64 {
        twopc_common::now_ms()
    }

    fn monotonic_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn sleep(&self, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    fn random(&self) -> u64 {
        rand::random()
    }
}
