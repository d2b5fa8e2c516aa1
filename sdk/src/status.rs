//! The public reads: one transaction's branch here (`<name>.tx`) and the
//! branches in doubt (`<name>.in_doubt`), from the read-only connections.

use bytes::Bytes;
use rusqlite::OptionalExtension;
use twopc_common::serve::Response;
use twopc_schemas::api::{
    ApiError, BranchStatus, ParticipantInDoubt, TxQuery, MAX_IN_DOUBT_LISTED,
};

use crate::resource::Resource;
use crate::service::{db_error, refusal, Participant};
use crate::store::{list_in_doubt, load_branch};

impl<R: Resource> Participant<R> {
    pub(crate) async fn on_tx_status(&self, payload: Bytes) -> Response {
        let tx = match TxQuery::parse(&payload) {
            Ok(tx) => tx,
            Err(e) => return refusal(&e),
        };
        let name = self.name();
        let res = self
            .reads
            .run(move |c| {
                let b = load_branch(c, tx)?;
                let at: Option<i64> = c
                    .query_row(
                        "SELECT updated_at_ms FROM branches WHERE tx = ?1",
                        [tx.as_bytes().as_slice()],
                        |r| r.get(0),
                    )
                    .optional()?;
                Ok((b, at))
            })
            .await;
        match res {
            Ok((b, at)) => {
                let status = BranchStatus {
                    tx: tx.to_string(),
                    participant: name.to_string(),
                    state: b
                        .as_ref()
                        .map_or("unknown", |b| b.state.as_str())
                        .to_owned(),
                    code: b.as_ref().and_then(|b| b.code),
                    message: b.as_ref().and_then(|b| b.message.clone()),
                    op: b
                        .as_ref()
                        .and_then(|b| b.op.as_ref())
                        .and_then(|op| serde_json::from_str(op).ok()),
                    updated_at_ms: at,
                };
                Response::ok(serde_json::to_vec(&status).expect("status serialises"))
            }
            Err(e) => refusal(&db_error(e)),
        }
    }

    /// Prepared branches awaiting a decision (at most
    /// [`MAX_IN_DOUBT_LISTED`], oldest first, `truncated` if there are more).
    pub(crate) async fn in_doubt(&self) -> Result<ParticipantInDoubt, ApiError> {
        let (prepared, truncated) = self
            .reads
            .run(|c| list_in_doubt(c, MAX_IN_DOUBT_LISTED))
            .await
            .map_err(db_error)?;
        Ok(ParticipantInDoubt {
            participant: self.name().to_string(),
            prepared,
            truncated,
        })
    }
}
