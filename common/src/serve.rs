//! Serving a NATS subject with bounded concurrency, service statistics and
//! graceful shutdown.
//!
//! The subscription loop only receives and spawns, so it never falls behind
//! the 65,536-message subscription buffer because of slow handlers; a
//! semaphore bounds the handlers in flight, and past the bound a request is
//! answered at once with the endpoint's `busy` reply instead of queueing.
//!
//! Shutdown ([`Shutdown::begin`], on SIGTERM): every endpoint stops taking
//! messages (it drains the subscription: unsubscribes, and still handles
//! what the server had sent before it saw that, which are requests in
//! flight), waits up to [`DRAIN_TIMEOUT`] for its handlers in flight, and
//! returns. The signal is passed in, not process-global, so
//! that several services can run in one process and stop one at a time.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, HeaderMap, Message};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{watch, Semaphore};

use crate::micro::Registry;

/// Longest wait for handlers in flight at shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// One service's shutdown signal, handed to every endpoint and background
/// loop of that service. Clones share the signal.
#[derive(Debug, Clone)]
pub struct Shutdown(Arc<watch::Sender<bool>>);

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown(Arc::new(watch::channel(false).0))
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells every holder to drain and stop.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    pub fn is_begun(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has begun.
    pub async fn begun(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// What every endpoint of one service shares: its connection, its
/// service-protocol statistics and its shutdown signal.
#[derive(Clone)]
pub struct Serving {
    pub client: Client,
    pub registry: Arc<Registry>,
    pub shutdown: Shutdown,
}

/// A handler's answer: the reply body and, for an error reply, the
/// service-protocol status (`Nats-Service-Error-Code`) and description.
#[derive(Debug, Clone)]
pub struct Response {
    pub body: Bytes,
    pub error: Option<(u16, String)>,
}

impl Response {
    pub fn ok(body: impl Into<Bytes>) -> Response {
        Response {
            body: body.into(),
            error: None,
        }
    }

    pub fn error(body: impl Into<Bytes>, status: u16, description: impl Into<String>) -> Response {
        Response {
            body: body.into(),
            error: Some((status, description.into())),
        }
    }

    /// A JSON reply of `r`'s value, or of `refuse(e)` for its error.
    pub fn json<T: serde::Serialize, E>(
        r: Result<T, E>,
        refuse: impl FnOnce(&E) -> Response,
    ) -> Response {
        match r {
            Ok(v) => Response::ok(serde_json::to_vec(&v).expect("reply serialises")),
            Err(e) => refuse(&e),
        }
    }
}

/// One endpoint to serve.
pub struct Endpoint {
    pub client: Client,
    pub registry: Arc<Registry>,
    pub shutdown: Shutdown,
    /// Endpoint name in the service protocol.
    pub name: &'static str,
    pub subject: String,
    pub queue: String,
    pub max_inflight: usize,
    /// Sent at once when `max_inflight` handlers are running.
    pub busy: Response,
}

/// Sends a reply, waiting at most [`crate::nats::REPLY_DEADLINE_MS`] for room
/// in the client's queue (it can be full while disconnected).
async fn reply(client: &Client, to: async_nats::Subject, r: Response) {
    let publish = async {
        match &r.error {
            None => client.publish(to, r.body.clone()).await,
            Some((status, description)) => {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Service-Error", description.as_str());
                headers.insert("Nats-Service-Error-Code", status.to_string().as_str());
                client
                    .publish_with_headers(to, headers, r.body.clone())
                    .await
            }
        }
    };
    let deadline = Duration::from_millis(crate::nats::REPLY_DEADLINE_MS);
    match tokio::time::timeout(deadline, publish).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "reply not sent"),
        Err(_) => tracing::warn!(
            deadline_ms = crate::nats::REPLY_DEADLINE_MS,
            "reply not sent: the NATS client could not queue it in time (disconnected?)"
        ),
    }
}

/// Serves `ep` with `handler` until shutdown (then drains) or until the
/// client closes.
pub async fn serve<H, F>(ep: Endpoint, handler: H) -> anyhow::Result<()>
where
    H: Fn(Message) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let index = ep.registry.add(ep.name, &ep.subject, &ep.queue);
    let mut sub = ep
        .client
        .queue_subscribe(ep.subject.clone(), ep.queue.clone())
        .await?;
    let permits = Arc::new(Semaphore::new(ep.max_inflight));
    let handler = Arc::new(handler);
    let mut shutdown = ep.shutdown.0.subscribe();
    let mut draining = false;
    loop {
        let msg = if draining {
            // Messages the server sent before it saw the unsubscribe are
            // requests in flight: answer them too. The stream ends once the
            // server confirmed the unsubscribe.
            match tokio::time::timeout(DRAIN_TIMEOUT, sub.next()).await {
                Ok(Some(m)) => m,
                _ => break,
            }
        } else {
            let next = tokio::select! {
                m = sub.next() => Some(m),
                _ = shutdown.wait_for(|s| *s) => None,
            };
            match next {
                Some(Some(m)) => m,
                Some(None) => break,
                None => {
                    draining = sub.drain().await.is_ok();
                    if !draining {
                        break;
                    }
                    continue;
                }
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            crate::refusals::refused(
                ep.name,
                "busy",
                || tracing::warn!(subject = %ep.subject, "at the in-flight limit; answering busy"),
            );
            if let Some(to) = msg.reply {
                let status = ep.busy.error.as_ref().map(|(_, d)| d.as_str());
                ep.registry
                    .record(index, Duration::ZERO, Some(status.unwrap_or("busy")));
                reply(&ep.client, to, ep.busy.clone()).await;
            }
            continue;
        };
        let client = ep.client.clone();
        let handler = handler.clone();
        let registry = ep.registry.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let to = msg.reply.clone();
            let r = handler(msg).await;
            let error = r.error.as_ref().map(|(s, d)| format!("{s}:{d}"));
            registry.record(index, started.elapsed(), error.as_deref());
            if let Some(to) = to {
                reply(&client, to, r).await;
            }
            drop(permit);
        });
    }
    // No new messages (drained above, or unsubscribe now), then wait for
    // the handlers still running, bounded.
    if !draining {
        let _ = sub.unsubscribe().await;
    }
    let all = u32::try_from(ep.max_inflight).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(subject = %ep.subject, "handlers still running after the drain timeout");
    }
    Ok(())
}
