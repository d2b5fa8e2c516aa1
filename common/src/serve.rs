//! Serving a NATS subject with bounded concurrency.
//!
//! The subscription loop only receives and spawns, so it never falls behind
//! the 65,536-message subscription buffer because of slow handlers; a
//! semaphore bounds the handlers in flight, and past the bound a request is
//! answered at once with the caller's `busy` reply instead of queueing.

use std::future::Future;
use std::sync::Arc;

use async_nats::{Client, Message};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::Semaphore;

/// Subscribes `subject` in queue group `queue` and runs `handler` for each
/// message; a returned `Some(bytes)` is published to the message's reply
/// subject. Returns when the subscription ends (client closed).
pub async fn serve<H, F>(
    client: Client,
    subject: String,
    queue: String,
    max_inflight: usize,
    busy_reply: Bytes,
    handler: H,
) -> anyhow::Result<()>
where
    H: Fn(Message) -> F + Send + Sync + 'static,
    F: Future<Output = Option<Bytes>> + Send + 'static,
{
    let mut sub = client.queue_subscribe(subject.clone(), queue).await?;
    let permits = Arc::new(Semaphore::new(max_inflight));
    let handler = Arc::new(handler);
    while let Some(msg) = sub.next().await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%subject, "at the in-flight limit; answering busy");
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, busy_reply.clone()).await;
            }
            continue;
        };
        let client = client.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let reply = msg.reply.clone();
            let out = handler(msg).await;
            if let (Some(reply), Some(out)) = (reply, out) {
                if let Err(e) = client.publish(reply, out).await {
                    tracing::warn!(error = %e, "reply not sent");
                }
            }
            drop(permit);
        });
    }
    Ok(())
}
