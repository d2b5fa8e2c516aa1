//! The NATS services ("micro") protocol: `$SRV.PING`, `$SRV.INFO` and
//! `$SRV.STATS` (optionally `.<name>` and `.<name>.<id>`), so `nats micro
//! ls`, `nats micro info wallet` and `nats micro stats coordinator` show
//! twopc's services, their endpoints and request and error counts.
//!
//! Implemented here rather than with async-nats' `service` module because
//! that module sends error replies with an empty body; twopc's public API
//! answers errors with a JSON body *and* the standard `Nats-Service-Error`
//! and `Nats-Service-Error-Code` headers, and still counts them as errors.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// One endpoint's counters.
#[derive(Debug, Clone, Default)]
struct Counters {
    requests: u64,
    errors: u64,
    processing: Duration,
    last_error: String,
}

#[derive(Debug, Clone)]
struct Endpoint {
    name: String,
    subject: String,
    queue_group: String,
    counters: Counters,
}

/// A service's identity and its endpoints' statistics.
#[derive(Debug)]
pub struct Registry {
    pub name: String,
    pub id: String,
    pub version: String,
    pub description: String,
    started: String,
    endpoints: Mutex<Vec<Endpoint>>,
    /// The service's metadata in every ping, info and stats answer.
    metadata: BTreeMap<String, String>,
}

/// `io.nats.micro.v1.ping_response`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ping {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub id: String,
    pub version: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// One endpoint in an info response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub name: String,
    pub subject: String,
    pub queue_group: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// `io.nats.micro.v1.info_response`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub id: String,
    pub version: String,
    pub description: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub endpoints: Vec<EndpointInfo>,
}

/// One endpoint in a stats response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointStats {
    pub name: String,
    pub subject: String,
    pub queue_group: String,
    pub num_requests: u64,
    pub num_errors: u64,
    pub last_error: String,
    /// Nanoseconds.
    pub processing_time: u64,
    /// Nanoseconds.
    pub average_processing_time: u64,
}

/// `io.nats.micro.v1.stats_response`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub id: String,
    pub version: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub started: String,
    pub endpoints: Vec<EndpointStats>,
}

fn rfc3339_now() -> String {
    // Civil time from the Unix epoch (UTC), without a date crate.
    let ms = crate::now_ms();
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60,
        ms.rem_euclid(1000)
    )
}

impl Registry {
    pub fn new(name: &str, version: &str, description: &str) -> Registry {
        let id: String = {
            use rand::Rng;
            let mut rng = rand::rng();
            (0..22)
                .map(|_| {
                    let c = rng.random_range(0..36u8);
                    (if c < 10 { b'0' + c } else { b'A' + c - 10 }) as char
                })
                .collect()
        };
        Registry {
            name: name.into(),
            id,
            version: version.into(),
            description: description.into(),
            started: rfc3339_now(),
            endpoints: Mutex::new(vec![]),
            metadata: BTreeMap::new(),
        }
    }

    /// Adds one metadata entry (a twopc service says which protocol
    /// layouts it speaks: `twopc_speaks`).
    pub fn with_metadata(mut self, key: &str, value: impl Into<String>) -> Registry {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Adds an endpoint; returns its index for [`Registry::record`].
    pub fn add(&self, name: &str, subject: &str, queue_group: &str) -> usize {
        let mut e = self.endpoints.lock().expect("lock");
        e.push(Endpoint {
            name: name.into(),
            subject: subject.into(),
            queue_group: queue_group.into(),
            counters: Counters::default(),
        });
        e.len() - 1
    }

    /// Counts one handled request.
    pub fn record(&self, endpoint: usize, took: Duration, error: Option<&str>) {
        let mut e = self.endpoints.lock().expect("lock");
        let c = &mut e[endpoint].counters;
        c.requests += 1;
        c.processing += took;
        if let Some(err) = error {
            c.errors += 1;
            c.last_error = err.to_owned();
        }
    }

    pub fn ping(&self) -> Ping {
        Ping {
            kind: "io.nats.micro.v1.ping_response".into(),
            name: self.name.clone(),
            id: self.id.clone(),
            version: self.version.clone(),
            metadata: self.metadata.clone(),
        }
    }

    pub fn info(&self) -> Info {
        let e = self.endpoints.lock().expect("lock");
        Info {
            kind: "io.nats.micro.v1.info_response".into(),
            name: self.name.clone(),
            id: self.id.clone(),
            version: self.version.clone(),
            description: self.description.clone(),
            metadata: BTreeMap::new(),
            endpoints: e
                .iter()
                .map(|e| EndpointInfo {
                    name: e.name.clone(),
                    subject: e.subject.clone(),
                    queue_group: e.queue_group.clone(),
                    metadata: BTreeMap::new(),
                })
                .collect(),
        }
    }

    pub fn stats(&self) -> Stats {
        let e = self.endpoints.lock().expect("lock");
        Stats {
            kind: "io.nats.micro.v1.stats_response".into(),
            name: self.name.clone(),
            id: self.id.clone(),
            version: self.version.clone(),
            metadata: self.metadata.clone(),
            started: self.started.clone(),
            endpoints: e
                .iter()
                .map(|e| {
                    let total = e.counters.processing.as_nanos() as u64;
                    EndpointStats {
                        name: e.name.clone(),
                        subject: e.subject.clone(),
                        queue_group: e.queue_group.clone(),
                        num_requests: e.counters.requests,
                        num_errors: e.counters.errors,
                        last_error: e.counters.last_error.clone(),
                        processing_time: total,
                        average_processing_time: total
                            .checked_div(e.counters.requests)
                            .unwrap_or(0),
                    }
                })
                .collect(),
        }
    }

    /// Answers `$SRV.{PING,INFO,STATS}[.name[.id]]` until the client closes.
    pub async fn serve_discovery(
        self: std::sync::Arc<Self>,
        client: async_nats::Client,
        shutdown: crate::serve::Shutdown,
    ) -> anyhow::Result<()> {
        let mut subs = vec![];
        for verb in ["PING", "INFO", "STATS"] {
            for subject in [
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.{}", self.name),
                format!("$SRV.{verb}.{}.{}", self.name, self.id),
            ] {
                let sub = client.subscribe(subject).await?;
                subs.push(sub.map(move |m| (verb, m)));
            }
        }
        let mut all = futures::stream::select_all(subs);
        loop {
            let next = tokio::select! {
                n = all.next() => n,
                _ = shutdown.begun() => None,
            };
            let Some((verb, msg)) = next else { break };
            let Some(reply) = msg.reply else { continue };
            let body = match verb {
                "PING" => serde_json::to_vec(&self.ping()),
                "INFO" => serde_json::to_vec(&self.info()),
                _ => serde_json::to_vec(&self.stats()),
            }
            .expect("serialises");
            let _ = client.publish(reply, body.into()).await;
        }
        Ok(())
    }
}

/// The subject a client pings to learn whether the service `name` is up
/// (`twopc ping`, container health checks).
pub fn ping_subject(name: &str) -> String {
    format!("$SRV.PING.{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_and_errors() {
        let r = Registry::new("wallet", "0.1.0", "balances");
        let i = r.add("prepare", "twopc.wallet.prepare", "twopc-wallet");
        r.record(i, Duration::from_micros(10), None);
        r.record(i, Duration::from_micros(30), Some("400:bad"));
        let s = r.stats();
        assert_eq!(s.endpoints[0].num_requests, 2);
        assert_eq!(s.endpoints[0].num_errors, 1);
        assert_eq!(s.endpoints[0].last_error, "400:bad");
        assert_eq!(s.endpoints[0].average_processing_time, 20_000);
        assert_eq!(r.info().endpoints[0].subject, "twopc.wallet.prepare");
        assert_eq!(r.id.len(), 22);
        assert!(
            s.started.ends_with('Z') && s.started.len() == 24,
            "{}",
            s.started
        );
    }
}
