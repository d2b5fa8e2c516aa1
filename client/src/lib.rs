//! # twopc-client: submit transactions from Rust
//!
//! [`TxClient`] submits a transaction (`shop.<client>.transaction`) or a
//! purchase (`shop.<client>.purchase`) and gives back what happened:
//!
//! * [`Submitted::Decided`]: the durable outcome, `committed` or `aborted`
//!   (with the reason), typed ([`TxReply`]);
//! * [`ClientError::Refused`]: the coordinator refused the request itself
//!   (`invalid_request`, `conflict`, `forbidden`, `unknown_participant`,
//!   ...): nothing was started, and sending it again changes nothing;
//! * [`ClientError::Unknown`]: no answer said what happened before the
//!   deadline. **Not an abort**: the transaction may have committed. Ask
//!   again with the same request id ([`TxClient::submit`] with
//!   `Some(request_id)`), which returns the first outcome once it is known
//!   and never runs the transaction twice.
//!
//! Every request carries a request id (one is made when none is given), so
//! the client retries safely: a timeout, "no responders", `busy`,
//! `unavailable`, `shutting_down` and `outcome_unknown` are retried with
//! the same id, with capped jittered backoff, until the deadline.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use twopc_client::{ClientError, Submitted, TxClient};
//! use twopc_schemas::tx::{Branch, Op};
//! use twopc_schemas::{ClientName, ParticipantName};
//!
//! let nats = async_nats::ConnectOptions::with_nkey("SU...".into())
//!     .custom_inbox_prefix("_INBOX_web")
//!     .connect("nats://127.0.0.1:4222")
//!     .await?;
//! let client = TxClient::new(nats, ClientName::new("web")?);
//! let branches = vec![
//!     Branch {
//!         participant: ParticipantName::new("wallet")?,
//!         op: Op::parse(br#"{"user":"alice","amount":300}"#)?,
//!     },
//!     Branch {
//!         participant: ParticipantName::new("order")?,
//!         op: Op::parse(br#"{"user":"alice","sku":"pen-1","qty":1,"amount":300}"#)?,
//!     },
//! ];
//! match client.submit(branches, Some("order-17".into())).await {
//!     Ok(Submitted::Decided(reply)) => println!("{:?} as {}", reply.outcome, reply.tx),
//!     Err(ClientError::Refused(e)) => println!("refused: {e}"),
//!     Err(ClientError::Unknown { request_id, .. }) => {
//!         println!("unknown: ask again with request id {request_id}")
//!     }
//!     Err(e) => println!("{e}"),
//! }
//! # Ok(())
//! # }
//! ```

use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;
use twopc_schemas::api::{ApiError, ErrorReply, PurchaseRequest, TxReply};
use twopc_schemas::tx::{Branch, TxSubmit};
use twopc_schemas::{subjects, ClientName, Code};

/// What a submission ended in, when its outcome is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// The durable decision (`committed` or `aborted`), for the request id
    /// in the reply; `duplicate` says it repeats an earlier answer.
    Decided(TxReply),
}

/// Why a submission has no decision to show.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Refused before anything started; retrying changes nothing.
    #[error("refused: {0}")]
    Refused(ApiError),
    /// No answer said what happened before the deadline: the transaction
    /// may or may not commit. Ask again with this request id.
    #[error("outcome unknown after {attempts} attempts (request id {request_id}): {last}")]
    Unknown {
        request_id: String,
        attempts: u32,
        last: String,
    },
    /// The request could not be encoded, or a reply was not twopc's.
    #[error("{0}")]
    Bad(String),
}

/// A shop client's handle for submitting transactions.
#[derive(Clone, Debug)]
pub struct TxClient {
    nats: async_nats::Client,
    client: ClientName,
    /// How long one attempt waits for its reply.
    attempt_timeout: Duration,
    /// How long a submission keeps retrying before it says `Unknown`.
    deadline: Duration,
}

impl TxClient {
    /// `nats` must be connected with `client`'s credentials (the server
    /// lets only them publish `shop.<client>.*`). Attempts wait 5 s each;
    /// a submission gives up after 30 s.
    pub fn new(nats: async_nats::Client, client: ClientName) -> TxClient {
        TxClient {
            nats,
            client,
            attempt_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
        }
    }

    /// How long a submission keeps retrying before it says `Unknown`, and
    /// how long each attempt waits (at most the deadline).
    pub fn with_deadline(mut self, deadline: Duration, attempt_timeout: Duration) -> TxClient {
        self.deadline = deadline;
        self.attempt_timeout = attempt_timeout.min(deadline);
        self
    }

    /// Submits a transaction. `request_id`: the idempotency key; `None`
    /// makes one (`tx-<uuidv7>`), returned in the reply or the error.
    pub async fn submit(
        &self,
        branches: Vec<Branch>,
        request_id: Option<String>,
    ) -> Result<Submitted, ClientError> {
        let request_id = request_id.unwrap_or_else(|| format!("tx-{}", uuid::Uuid::now_v7()));
        let body = TxSubmit {
            branches,
            request_id: Some(request_id.clone()),
        };
        self.send(subjects::transaction(&self.client), &body, request_id)
            .await
    }

    /// Submits a purchase (the purchase transaction type); `req.request_id`
    /// as for [`TxClient::submit`].
    pub async fn purchase(&self, mut req: PurchaseRequest) -> Result<Submitted, ClientError> {
        let request_id = req
            .request_id
            .get_or_insert_with(|| format!("purchase-{}", uuid::Uuid::now_v7()))
            .clone();
        self.send(subjects::purchase(&self.client), &req, request_id)
            .await
    }

    async fn send<B: Serialize>(
        &self,
        subject: String,
        body: &B,
        request_id: String,
    ) -> Result<Submitted, ClientError> {
        let payload = serde_json::to_vec(body).map_err(|e| ClientError::Bad(e.to_string()))?;
        let started = Instant::now();
        let mut attempts = 0;
        let mut pause = Duration::from_millis(50);
        loop {
            attempts += 1;
            let left = self.deadline.saturating_sub(started.elapsed());
            let request = async_nats::Request::new()
                .payload(payload.clone().into())
                .timeout(Some(self.attempt_timeout.min(left)));
            let last = match self.nats.send_request(subject.clone(), request).await {
                Ok(msg) => match classify(&msg.payload) {
                    Answer::Decided(r) => return Ok(Submitted::Decided(r)),
                    Answer::Refused(e) => return Err(ClientError::Refused(e)),
                    Answer::Again(why) => why,
                    Answer::Garbled(why) => return Err(ClientError::Bad(why)),
                },
                // A timeout, no responders, a lost connection: unknown,
                // and safe to send again under the same request id.
                Err(e) => e.to_string(),
            };
            if started.elapsed() + pause >= self.deadline {
                return Err(ClientError::Unknown {
                    request_id,
                    attempts,
                    last,
                });
            }
            let jitter = rand::rng().random_range(0..=pause.as_millis() as u64 / 2);
            tokio::time::sleep(pause + Duration::from_millis(jitter)).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

/// What one reply means.
#[derive(Debug, PartialEq)]
enum Answer {
    Decided(TxReply),
    Refused(ApiError),
    /// Send again with the same request id.
    Again(String),
    Garbled(String),
}

/// Which error replies are worth sending again: the coordinator did not
/// start the transaction, or does not know yet how it ended.
fn retriable(code: Code) -> bool {
    matches!(
        code,
        Code::Busy | Code::Unavailable | Code::ShuttingDown | Code::OutcomeUnknown | Code::Timeout
    )
}

fn classify(raw: &[u8]) -> Answer {
    if let Ok(ErrorReply { error }) = serde_json::from_slice::<ErrorReply>(raw) {
        return if retriable(error.code) {
            Answer::Again(error.to_string())
        } else {
            Answer::Refused(error)
        };
    }
    match serde_json::from_slice::<TxReply>(raw) {
        Ok(r) => Answer::Decided(r),
        Err(e) => Answer::Garbled(format!(
            "not a twopc reply ({e}): {}",
            String::from_utf8_lossy(raw)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_decided_refused_or_sent_again() {
        let decided = br#"{"tx":"t","outcome":"aborted","reason":{"participant":"wallet","code":"insufficient_funds","message":"m"},"delivered":false,"duplicate":true}"#;
        match classify(decided) {
            Answer::Decided(r) => assert!(r.duplicate),
            other => panic!("{other:?}"),
        }
        for (code, again) in [
            ("busy", true),
            ("outcome_unknown", true),
            ("unavailable", true),
            ("shutting_down", true),
            ("conflict", false),
            ("forbidden", false),
            ("invalid_request", false),
            ("unknown_participant", false),
        ] {
            let raw = format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#);
            let a = classify(raw.as_bytes());
            assert_eq!(matches!(a, Answer::Again(_)), again, "{code}: {a:?}");
            assert_eq!(matches!(a, Answer::Refused(_)), !again, "{code}: {a:?}");
        }
        assert!(matches!(classify(b"<html>"), Answer::Garbled(_)));
    }
}
