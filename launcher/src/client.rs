//! A small JSON client for the public subjects, shared by the CLI and tests.

use std::time::Duration;

use anyhow::Context;
use serde::{de::DeserializeOwned, Serialize};
use twopc_schemas::api::ErrorReply;

/// A shop client's connection: it buys on its own purchase subject.
#[derive(Clone, Debug)]
pub struct Shop {
    pub client: async_nats::Client,
    pub name: twopc_schemas::ClientName,
}

impl Shop {
    /// `shop.<name>.purchase`.
    pub fn purchase_subject(&self) -> String {
        twopc_schemas::subjects::purchase(&self.name)
    }

    /// `shop.<name>.tx`: this client's own transactions.
    pub fn tx_subject(&self) -> String {
        twopc_schemas::subjects::client_tx(&self.name)
    }

    /// How the coordinator's log keys this client's `request_id`.
    pub fn log_key(&self, request_id: &str) -> String {
        twopc_schemas::client::scope_request_id(&self.name, request_id)
    }
}

/// The reply to a public request: the value, or the service's error reply.
#[derive(Debug)]
pub enum Reply<T> {
    Ok(T),
    Err(ErrorReply),
}

/// Sends `body` as JSON and parses the reply as `T` or an error reply.
/// A timeout is an `Err` of the call (unknown outcome), never an answer.
pub async fn request<B: Serialize, T: DeserializeOwned>(
    client: &async_nats::Client,
    subject: &str,
    body: &B,
    timeout: Duration,
) -> anyhow::Result<Reply<T>> {
    let payload = serde_json::to_vec(body)?;
    let raw = request_raw(client, subject, payload, timeout).await?;
    parse_reply(&raw)
}

/// Sends raw bytes, as `nats req` does, and returns the raw reply.
pub async fn request_raw(
    client: &async_nats::Client,
    subject: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    let req = async_nats::Request::new()
        .payload(payload.into())
        .timeout(Some(timeout));
    let msg = client
        .send_request(subject.to_owned(), req)
        .await
        .with_context(|| format!("request to {subject}"))?;
    Ok(msg.payload.to_vec())
}

pub fn parse_reply<T: DeserializeOwned>(raw: &[u8]) -> anyhow::Result<Reply<T>> {
    if let Ok(e) = serde_json::from_slice::<ErrorReply>(raw) {
        return Ok(Reply::Err(e));
    }
    let v = serde_json::from_slice(raw)
        .with_context(|| format!("unexpected reply: {}", String::from_utf8_lossy(raw)))?;
    Ok(Reply::Ok(v))
}
