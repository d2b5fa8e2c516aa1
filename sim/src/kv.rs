//! The simulation's JetStream KV: an in-memory store with the semantics the
//! decision log relies on (put-if-absent, compare-and-set on the revision,
//! delete at a revision) and the ways the real one may misbehave that the
//! log must survive: answers lost after the write landed, writes that land
//! after the caller gave up, and reads from a leader that has not seen the
//! latest write yet. [`SimKv`] is the [`KvStore`] the production
//! `KvLog` runs over; every call goes out through the world's event queue,
//! so the seed decides when it lands and whether its answer comes back.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::channel::oneshot;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use twopc_coordinator::kv::{Create, Entry, KvStore, Update};

/// One operation as it reaches the store.
#[derive(Debug, Clone)]
pub enum KvOp {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        revision: u64,
    },
    Latest {
        key: String,
    },
    DeleteAt {
        key: String,
        revision: u64,
    },
    Scan {
        prefix: String,
    },
}

/// The store's answer.
#[derive(Debug, Clone)]
pub enum KvResult {
    Create(Create),
    Update(Update),
    Latest(Option<Entry>),
    Deleted(bool),
    Scan(Vec<Entry>),
    /// No answer within the caller's timeout (or the call was lost).
    TimedOut,
}

/// One version of a key: its value (`None`: deleted), revision and when it
/// was written (simulated µs).
#[derive(Debug, Clone)]
pub struct Version {
    pub value: Option<Bytes>,
    pub revision: u64,
    pub at_us: u64,
}

/// The store's state: every key's history (the current value is the last).
#[derive(Debug, Default)]
pub struct KvState {
    pub keys: BTreeMap<String, Vec<Version>>,
    /// The stream's last sequence number (revisions are stream sequences).
    pub seq: u64,
}

impl KvState {
    fn current(&self, key: &str) -> Option<&Version> {
        self.keys.get(key).and_then(|h| h.last())
    }

    fn live(&self, key: &str) -> Option<Entry> {
        let v = self.current(key)?;
        v.value.as_ref().map(|value| Entry {
            key: key.to_owned(),
            value: value.clone(),
            revision: v.revision,
        })
    }

    fn write(&mut self, key: &str, value: Option<Bytes>, at_us: u64) -> u64 {
        self.seq += 1;
        let revision = self.seq;
        self.keys.entry(key.to_owned()).or_default().push(Version {
            value,
            revision,
            at_us,
        });
        revision
    }

    /// Applies `op` at time `at_us`. A `Latest` may be answered as of
    /// `stale_us` earlier (a deposed leader that has not applied the newest
    /// writes); everything else is linearisable, as JetStream's writes are.
    pub fn apply(&mut self, op: KvOp, at_us: u64, stale_us: u64) -> KvResult {
        match op {
            KvOp::Create { key, value } => {
                if self.live(&key).is_some() {
                    KvResult::Create(Create::Lost)
                } else {
                    self.write(&key, Some(value), at_us);
                    KvResult::Create(Create::Written)
                }
            }
            KvOp::Update {
                key,
                value,
                revision,
            } => match self.live(&key) {
                Some(e) if e.revision == revision => {
                    self.write(&key, Some(value), at_us);
                    KvResult::Update(Update::Written)
                }
                _ => KvResult::Update(Update::WrongRevision),
            },
            KvOp::Latest { key } => {
                if stale_us == 0 {
                    return KvResult::Latest(self.live(&key));
                }
                let as_of = at_us.saturating_sub(stale_us);
                let old = self.keys.get(&key).and_then(|h| {
                    h.iter().rev().find(|v| v.at_us <= as_of).and_then(|v| {
                        v.value.as_ref().map(|value| Entry {
                            key: key.clone(),
                            value: value.clone(),
                            revision: v.revision,
                        })
                    })
                });
                KvResult::Latest(old)
            }
            KvOp::DeleteAt { key, revision } => match self.live(&key) {
                Some(e) if e.revision == revision => {
                    self.write(&key, None, at_us);
                    KvResult::Deleted(true)
                }
                _ => KvResult::Deleted(false),
            },
            KvOp::Scan { prefix } => KvResult::Scan(
                self.keys
                    .keys()
                    .filter(|k| k.starts_with(&prefix))
                    .filter_map(|k| self.live(k))
                    .collect(),
            ),
        }
    }
}

/// What a [`SimKv`] asks of the world.
pub enum Outgoing {
    /// A store call from `node`, answered through `reply`.
    Call {
        node: usize,
        op: KvOp,
        reply: oneshot::Sender<KvResult>,
    },
    /// A sleep of `ms` on `node`'s clock.
    Sleep {
        node: usize,
        ms: u64,
        wake: oneshot::Sender<()>,
    },
}

/// What the world shares with the store handles.
pub struct Shared {
    /// Simulated time, µs.
    pub now_us: u64,
    /// Each node's wall clock: simulated time plus this, ms.
    pub skew_ms: BTreeMap<usize, i64>,
    /// The random source of `random()` (writer ids).
    pub rng: StdRng,
    /// Calls and sleeps not yet taken by the world.
    pub outbox: Vec<Outgoing>,
    /// Direct mode (the conformance suite): calls apply at once to this
    /// state, sleeps end at once, no faults.
    pub direct: Option<KvState>,
}

/// Where simulated wall clocks start (2026-01-01), so that transaction ids
/// and timestamps are the same in every run of a seed.
pub const EPOCH_MS: i64 = 1_767_225_600_000;

impl Shared {
    pub fn wall_ms(&self, node: usize) -> i64 {
        EPOCH_MS
            + i64::try_from(self.now_us / 1_000).expect("fits")
            + self.skew_ms.get(&node).copied().unwrap_or(0)
    }
}

/// One process's handle on the simulated store (and its clocks).
#[derive(Clone)]
pub struct SimKv {
    pub node: usize,
    pub shared: Arc<Mutex<Shared>>,
}

impl SimKv {
    /// A store that answers at once and never fails, on its own clock that
    /// advances 1 ms per call: for the conformance suite.
    pub fn direct(seed: u64) -> SimKv {
        SimKv {
            node: 0,
            shared: Arc::new(Mutex::new(Shared {
                now_us: u64::try_from(twopc_common::now_ms() - EPOCH_MS).expect("after 2026")
                    * 1_000,
                skew_ms: BTreeMap::new(),
                rng: StdRng::seed_from_u64(seed),
                outbox: vec![],
                direct: Some(KvState::default()),
            })),
        }
    }

    fn call(&self, op: KvOp) -> impl Future<Output = KvResult> + Send + 'static {
        let pending = {
            let mut sh = self.shared.lock().expect("lock");
            let now = sh.now_us;
            if let Some(state) = sh.direct.as_mut() {
                let r = state.apply(op, now, 0);
                sh.now_us += 1_000;
                Err(r)
            } else {
                let (reply, rx) = oneshot::channel();
                sh.outbox.push(Outgoing::Call {
                    node: self.node,
                    op,
                    reply,
                });
                Ok(rx)
            }
        };
        async move {
            match pending {
                Err(r) => r,
                // A dropped sender is a call that will never be answered.
                Ok(rx) => rx.await.unwrap_or(KvResult::TimedOut),
            }
        }
    }
}

impl KvStore for SimKv {
    async fn create(&self, key: &str, value: Bytes) -> Create {
        match self
            .call(KvOp::Create {
                key: key.to_owned(),
                value,
            })
            .await
        {
            KvResult::Create(c) => c,
            KvResult::TimedOut => Create::Unknown("timed out".into()),
            other => unreachable!("create answered {other:?}"),
        }
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Update {
        match self
            .call(KvOp::Update {
                key: key.to_owned(),
                value,
                revision,
            })
            .await
        {
            KvResult::Update(u) => u,
            KvResult::TimedOut => Update::Unknown("timed out".into()),
            other => unreachable!("update answered {other:?}"),
        }
    }

    async fn latest(&self, key: &str) -> Result<Option<Entry>, String> {
        match self
            .call(KvOp::Latest {
                key: key.to_owned(),
            })
            .await
        {
            KvResult::Latest(e) => Ok(e),
            KvResult::TimedOut => Err("timed out".into()),
            other => unreachable!("latest answered {other:?}"),
        }
    }

    async fn delete_at(&self, key: &str, revision: u64) -> Result<bool, String> {
        match self
            .call(KvOp::DeleteAt {
                key: key.to_owned(),
                revision,
            })
            .await
        {
            KvResult::Deleted(d) => Ok(d),
            KvResult::TimedOut => Err("timed out".into()),
            other => unreachable!("delete answered {other:?}"),
        }
    }

    async fn scan(
        &self,
        prefix: &str,
        keep: &(dyn Fn(&Entry) -> bool + Sync),
    ) -> Result<Vec<Entry>, String> {
        match self
            .call(KvOp::Scan {
                prefix: prefix.to_owned(),
            })
            .await
        {
            KvResult::Scan(all) => Ok(all.into_iter().filter(|e| keep(e)).collect()),
            KvResult::TimedOut => Err("timed out".into()),
            other => unreachable!("scan answered {other:?}"),
        }
    }

    fn now_ms(&self) -> i64 {
        self.shared.lock().expect("lock").wall_ms(self.node)
    }

    fn monotonic_ms(&self) -> u64 {
        self.shared.lock().expect("lock").now_us / 1_000
    }

    fn sleep(&self, ms: u64) -> impl Future<Output = ()> + Send {
        let rx = {
            let mut sh = self.shared.lock().expect("lock");
            if sh.direct.is_some() {
                sh.now_us += ms * 1_000;
                None
            } else {
                let (wake, rx) = oneshot::channel();
                sh.outbox.push(Outgoing::Sleep {
                    node: self.node,
                    ms,
                    wake,
                });
                Some(rx)
            }
        };
        async move {
            if let Some(rx) = rx {
                // A dropped waker is a process that crashed: never wake.
                if rx.await.is_err() {
                    futures::future::pending::<()>().await;
                }
            }
        }
    }

    fn random(&self) -> u64 {
        self.shared.lock().expect("lock").rng.next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twopc_coordinator::kv::KvLog;

    /// The stand-in passes the same suite as SQLite and JetStream KV.
    #[tokio::test]
    async fn the_stand_in_passes_the_decision_log_conformance_suite() {
        let log = KvLog::new(SimKv::direct(7), std::time::Duration::from_millis(500));
        twopc_coordinator::conformance::run_all(&log).await;
    }
}
