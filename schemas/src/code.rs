use serde::{Deserialize, Serialize};

/// A machine-readable reason: why a participant voted no, why a transaction
/// aborted, or why a request was refused.
///
/// It travels as a postcard variant index inside protocol messages and as a
/// snake_case string in JSON. Append new codes at the end; never reorder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// The user's balance minus holds does not cover the amount.
    InsufficientFunds,
    /// The product's stock minus reservations does not cover the quantity.
    OutOfStock,
    /// `amount` is not price × qty at the order service.
    PriceMismatch,
    UnknownUser,
    UnknownSku,
    /// A participant did not answer within the prepare timeout. The
    /// participant may still have prepared; it will learn the abort.
    Timeout,
    /// Nobody serves the participant's subject (NATS "no responders"), or a
    /// store the request needs did not answer; nothing was changed: retry.
    Unavailable,
    /// The transaction was already aborted at this participant (for example a
    /// prepare arriving after the abort): a tombstone answers no.
    AlreadyAborted,
    /// The coordinator recorded abort because a participant asked for the
    /// decision of a transaction that had none yet (presumed abort).
    PresumedAbort,
    /// The request is not valid JSON.
    MalformedJson,
    /// The request is JSON but a field is missing, mistyped or out of range.
    InvalidRequest,
    /// The request is larger than the service accepts.
    PayloadTooLarge,
    /// The object to create exists already.
    AlreadyExists,
    /// The service is at its limit of work in flight; retry later.
    Busy,
    /// A protocol message did not decode (wrong version, kind or bytes), or
    /// a field is outside the protocol's limits (the public API's).
    BadMessage,
    /// The request is well formed but contradicts recorded state (a commit
    /// for an aborted branch, an abort for a committed one).
    Conflict,
    /// The transaction id is not known here.
    UnknownTx,
    /// Something failed inside the service; the request changed nothing.
    Internal,
    /// The service is shutting down and takes no new work.
    ShuttingDown,
    /// The outcome is not known (for example the decision log failed while
    /// recording it): the purchase may or may not happen. Not an abort:
    /// retry with the same `request_id` to learn the outcome, or ask
    /// `shop.tx` about the transaction named in the message.
    OutcomeUnknown,
    /// The transaction is older than the protocol's window (see
    /// `protocol::TxWindow`): too old to prepare or to commit.
    Expired,
    /// A protocol message's transaction id is not a UUIDv7, so its age
    /// cannot be known (`protocol::TxWindow::check_tx`).
    BadTxId,
    /// A protocol message's transaction id starts further in the future
    /// than the tolerated clock skew (`protocol::TxWindow::check_tx`).
    TxInFuture,
    /// A decision query whose body names another participant than the
    /// one its subject says sent it (`twopc.decision.<participant>`).
    WrongSender,
    /// A decision query from a participant that is not a branch of the
    /// transaction.
    NotABranch,
    /// This participant instance does not hold its name's lease (or its
    /// lease lapsed and is not renewed yet): it writes nothing. The owner,
    /// or this instance once renewed, will answer a retry.
    NotOwner,
    /// The client may not name this participant in a transaction (its
    /// grant, `TWOPC_CLIENT_GRANTS`, does not list it).
    Forbidden,
    /// A transaction names a participant the coordinator does not know
    /// (`TWOPC_PARTICIPANTS`).
    UnknownParticipant,
    /// A protocol message of a kind or version the receiver does not speak;
    /// nothing was done ([`crate::protocol::Unsupported`] says what it speaks).
    Unsupported,
}

impl Code {
    /// The snake_case name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InsufficientFunds => "insufficient_funds",
            Code::OutOfStock => "out_of_stock",
            Code::PriceMismatch => "price_mismatch",
            Code::UnknownUser => "unknown_user",
            Code::UnknownSku => "unknown_sku",
            Code::Timeout => "timeout",
            Code::Unavailable => "unavailable",
            Code::AlreadyAborted => "already_aborted",
            Code::PresumedAbort => "presumed_abort",
            Code::MalformedJson => "malformed_json",
            Code::InvalidRequest => "invalid_request",
            Code::PayloadTooLarge => "payload_too_large",
            Code::AlreadyExists => "already_exists",
            Code::Busy => "busy",
            Code::BadMessage => "bad_message",
            Code::Conflict => "conflict",
            Code::UnknownTx => "unknown_tx",
            Code::Internal => "internal",
            Code::ShuttingDown => "shutting_down",
            Code::OutcomeUnknown => "outcome_unknown",
            Code::Expired => "expired",
            Code::BadTxId => "bad_tx_id",
            Code::TxInFuture => "tx_in_future",
            Code::WrongSender => "wrong_sender",
            Code::NotABranch => "not_a_branch",
            Code::NotOwner => "not_owner",
            Code::Forbidden => "forbidden",
            Code::UnknownParticipant => "unknown_participant",
            Code::Unsupported => "unsupported",
        }
    }

    /// The HTTP-like status a reply with this code carries in the service
    /// protocol's `Nats-Service-Error-Code` header.
    pub fn status(self) -> u16 {
        match self {
            Code::UnknownUser | Code::UnknownSku | Code::UnknownTx | Code::UnknownParticipant => {
                404
            }
            Code::AlreadyExists | Code::Conflict => 409,
            Code::PayloadTooLarge => 413,
            Code::Busy | Code::ShuttingDown | Code::Unavailable | Code::NotOwner => 503,
            Code::Internal => 500,
            Code::Timeout | Code::OutcomeUnknown => 504,
            Code::Expired => 410,
            Code::WrongSender | Code::NotABranch | Code::Forbidden => 403,
            Code::InsufficientFunds
            | Code::OutOfStock
            | Code::PriceMismatch
            | Code::AlreadyAborted
            | Code::PresumedAbort
            | Code::MalformedJson
            | Code::InvalidRequest
            | Code::BadMessage
            | Code::Unsupported
            | Code::BadTxId
            | Code::TxInFuture => 400,
        }
    }

    /// Parses the snake_case name (used when reading codes back from SQLite).
    pub fn parse(s: &str) -> Option<Code> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_str_matches_serde_and_parses_back() {
        let all = [
            Code::InsufficientFunds,
            Code::OutOfStock,
            Code::PriceMismatch,
            Code::UnknownUser,
            Code::UnknownSku,
            Code::Timeout,
            Code::Unavailable,
            Code::AlreadyAborted,
            Code::PresumedAbort,
            Code::MalformedJson,
            Code::InvalidRequest,
            Code::PayloadTooLarge,
            Code::AlreadyExists,
            Code::Busy,
            Code::BadMessage,
            Code::Conflict,
            Code::UnknownTx,
            Code::Internal,
            Code::ShuttingDown,
            Code::OutcomeUnknown,
            Code::Expired,
            Code::BadTxId,
            Code::TxInFuture,
            Code::WrongSender,
            Code::NotABranch,
            Code::NotOwner,
            Code::Forbidden,
            Code::UnknownParticipant,
            Code::Unsupported,
        ];
        for code in all {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(Code::parse(code.as_str()), Some(code));
        }
        assert_eq!(Code::parse("nope"), None);
    }

    #[test]
    fn wire_indices_of_appended_codes_are_pinned() {
        // Postcard writes a code as its variant index: appending keeps
        // every older index.
        for (code, index) in [
            (Code::InsufficientFunds, 0u8),
            (Code::Expired, 20),
            (Code::BadTxId, 21),
            (Code::TxInFuture, 22),
            (Code::WrongSender, 23),
            (Code::NotABranch, 24),
            (Code::NotOwner, 25),
            (Code::Forbidden, 26),
            (Code::UnknownParticipant, 27),
            (Code::Unsupported, 28),
        ] {
            assert_eq!(postcard::to_allocvec(&code).unwrap(), vec![index]);
        }
    }
}
