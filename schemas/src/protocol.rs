//! The internal coordinator ↔ participant protocol: postcard in an envelope.
//!
//! Envelope bytes: `version` (postcard varint u16), `kind` (one byte naming
//! the message type), then the postcard body, and nothing after it. A
//! receiver checks all three, so a message of another version, another type
//! or with trailing garbage is rejected as [`DecodeError`] rather than
//! misread. Then the message's own limits ([`Message::validate`]): internal
//! messages get the same identifier rules and quantity and amount caps as
//! the public API, so a forged or buggy message that a participant could
//! never apply is refused by [`decode`] before anyone acts on it.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

pub use crate::tx::MAX_OP_BYTES;
use crate::{ClientName, Code, ParticipantName};

/// The protocol version this build speaks: the highest layout version of
/// any of its messages ([`Message::VERSION`]).
pub const PROTOCOL_VERSION: u16 = 2;

/// Upper bound on any protocol message, in bytes. Larger payloads are
/// rejected before decoding.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024;

/// A transaction id: a UUIDv7, so ids sort by creation time.
pub type TxId = Uuid;

/// When the coordinator that made `tx` started it (the UUIDv7 timestamp,
/// ms since the epoch by that coordinator's clock); `None` for an id that
/// is not a UUIDv7.
pub fn started_at_ms(tx: TxId) -> Option<i64> {
    if tx.get_version_num() != 7 {
        return None;
    }
    let b = tx.as_bytes();
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(&b[..6]);
    Some(i64::from_be_bytes(ms))
}

/// The transaction window and retention, which together bound what is kept
/// without letting an old message break atomicity (ARCHITECTURE.md, "The
/// retention rule"):
/// * a participant prepares a transaction only within `window_ms` of its
///   start, and a coordinator records commit only within it;
/// * a record the protocol no longer needs (decided and acknowledged by
///   everyone) is kept for `retention_ms` after the decision, and
///   `retention_ms > window_ms + max_skew_ms`, so every message that could
///   still act on a transaction finds its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxWindow {
    pub window_ms: i64,
    pub retention_ms: i64,
    /// The clock skew between machines the rule tolerates.
    pub max_skew_ms: i64,
}

impl TxWindow {
    /// 5 minutes to prepare and commit, a minute of skew; records kept for
    /// a day.
    pub const DEFAULT: TxWindow = TxWindow {
        window_ms: 5 * 60_000,
        retention_ms: 24 * 3_600_000,
        max_skew_ms: 60_000,
    };

    /// Checks `retention > window + skew` and `retention >= 2 × window` (a
    /// commit decided at the end of the window must still be writable:
    /// [`TxWindow::decision_write_by_ms`]).
    pub fn new(window_ms: i64, retention_ms: i64, max_skew_ms: i64) -> Result<Self, String> {
        if window_ms <= 0 || max_skew_ms < 0 {
            return Err(format!(
                "the transaction window must be positive and the skew not negative, \
                 got {window_ms} ms and {max_skew_ms} ms"
            ));
        }
        if retention_ms <= window_ms + max_skew_ms {
            return Err(format!(
                "retention ({retention_ms} ms) must exceed the transaction window \
                 ({window_ms} ms) plus the tolerated clock skew ({max_skew_ms} ms)"
            ));
        }
        if retention_ms < 2 * window_ms {
            return Err(format!(
                "retention ({retention_ms} ms) must be at least twice the transaction \
                 window ({window_ms} ms): a decision is sent to the log only within half the \
                 retention of the transaction's start"
            ));
        }
        Ok(TxWindow {
            window_ms,
            retention_ms,
            max_skew_ms,
        })
    }

    /// The wall-clock time after which no decision of `tx` (its attempt's
    /// commit or abort, or a presumed abort) may be sent to the decision
    /// log any more: half the retention after its start (`None`: not a
    /// UUIDv7). With the assumption that a write sent lands within
    /// `retention / 2 − skew` or never, no decision lands later than
    /// `retention − skew` after the start: before any record of it can be
    /// collected, and before a decision query older than the retention
    /// reads the log and takes absence for abort (ARCHITECTURE.md, "The
    /// retention rule").
    pub fn decision_write_by_ms(&self, tx: TxId) -> Option<i64> {
        started_at_ms(tx).map(|t| t + self.retention_ms / 2)
    }

    /// Whether `tx` is older than the retention at `now_ms` (an id that is
    /// not a UUIDv7 always is).
    pub fn past_retention(&self, tx: TxId, now_ms: i64) -> bool {
        match started_at_ms(tx) {
            Some(t) => now_ms - t > self.retention_ms,
            None => true,
        }
    }

    /// Whether `tx` is past the window at `now_ms` (an id that is not a
    /// UUIDv7 always is: its age cannot be known).
    pub fn expired(&self, tx: TxId, now_ms: i64) -> bool {
        match started_at_ms(tx) {
            Some(t) => now_ms - t > self.window_ms,
            None => true,
        }
    }

    /// Checks a transaction id that arrived in a protocol message, at the
    /// receiver's clock `now_ms`: a UUIDv7 of the RFC 9562 variant
    /// (`bad_tx_id` otherwise: its age cannot be known) that starts at most
    /// `max_skew_ms` in the future (`tx_in_future` otherwise: it would stay
    /// "within the window" for longer than the rule allows). `Ok` says
    /// whether it is past the window; what that means is each handler's (a
    /// prepare is refused unless its branch is stored, a decision query
    /// writes nothing, ...): a message about an old transaction may still
    /// be needed, one with an impossible id never is.
    pub fn check_tx(&self, tx: TxId, now_ms: i64) -> Result<TxAge, Refused> {
        let started = match started_at_ms(tx) {
            Some(t) if tx.get_variant() == uuid::Variant::RFC4122 => t,
            _ => {
                return Err(Refused::new(
                    Code::BadTxId,
                    format!(
                        "tx {tx} is not a UUIDv7 (version {}): its age cannot be known",
                        tx.get_version_num()
                    ),
                ))
            }
        };
        let ahead_ms = started - now_ms;
        if ahead_ms > self.max_skew_ms {
            return Err(Refused::new(
                Code::TxInFuture,
                format!(
                    "tx {tx} starts {ahead_ms} ms in the future, more than the tolerated \
                     clock skew of {} ms",
                    self.max_skew_ms
                ),
            ));
        }
        Ok(if now_ms - started > self.window_ms {
            TxAge::Expired
        } else {
            TxAge::Within
        })
    }
}

/// Where a transaction stands at a receiver whose checks it passed
/// ([`TxWindow::check_tx`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxAge {
    /// Within the window: it may still be prepared, committed, tombstoned.
    Within,
    /// Past the window: nothing new is written for it; stored state still
    /// answers.
    Expired,
}

/// Why a receiver refuses a protocol message that decoded: the code of its
/// no vote or rejection, and which field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: Code,
    pub message: String,
}

impl Refused {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Refused {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// The 2PC decision. Not to be confused with a SQLite commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Decision {
    Commit,
    Abort,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Commit => "commit",
            Decision::Abort => "abort",
        }
    }
}

/// Phase 1 request, coordinator → participant: prepare your branch of
/// `tx`. `client` is the shop client that submitted the transaction (the
/// coordinator took it from the subject the server let only that client
/// publish); `op` is the branch's operation, opaque to the coordinator: the
/// canonical JSON the client gave ([`crate::tx::Op`]), at most
/// [`MAX_OP_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepare {
    pub tx: TxId,
    pub client: ClientName,
    pub op: Vec<u8>,
}

impl Prepare {
    /// What a participant checks of a prepare before acting on it, at its
    /// own clock (the one place; also right before writing): the
    /// transaction id ([`TxWindow::check_tx`]). `Ok` says whether it is
    /// past the window, where only a stored branch may answer. (Whether
    /// `op` means anything is the participant's own check.)
    pub fn check(&self, now_ms: i64, window: &TxWindow) -> Result<TxAge, Refused> {
        window.check_tx(self.tx, now_ms)
    }
}

/// Phase 1 reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Vote {
    /// The branch is durably prepared and will commit or abort as told.
    Yes,
    /// The branch cannot commit; nothing is held for it.
    No { code: Code, message: String },
}

/// Phase 2 request, coordinator → participant: the recorded decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decide {
    pub tx: TxId,
    pub decision: Decision,
}

impl Decide {
    /// What a participant checks of a decision before acting on it: the
    /// transaction id ([`TxWindow::check_tx`]); `stored` says whether it
    /// holds a branch of the transaction. A decision for a stored branch is
    /// applied whatever the participant's clock says — past the window
    /// (delivery goes on until acknowledged) or, after its clock stepped
    /// back, apparently from the future: nothing may strand a prepared
    /// branch. Without one, an id from the future is refused like a
    /// prepare's, and past the window no tombstone is written. (Before the
    /// store is read, pass `true`: only impossible ids are refused.)
    pub fn check(&self, now_ms: i64, window: &TxWindow, stored: bool) -> Result<TxAge, Refused> {
        match window.check_tx(self.tx, now_ms) {
            Err(r) if r.code == Code::TxInFuture && stored => Ok(TxAge::Within),
            checked => checked,
        }
    }
}

/// Phase 2 reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DecideReply {
    /// The decision is durably applied (or was already).
    Ack,
    /// The decision was not applied; `code` says why.
    Rejected { code: Code, message: String },
}

/// Participant → coordinator: what was decided for `tx`?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionQuery {
    pub tx: TxId,
    pub participant: ParticipantName,
}

impl DecisionQuery {
    /// What the coordinator checks of a decision query that arrived on
    /// `subject`: the subject names its sender
    /// ([`crate::subjects::decision_query`]; the server lets participant P
    /// publish only `twopc.decision.P`), and the body must name the same
    /// participant (`wrong_sender`); then the transaction id
    /// ([`TxWindow::check_tx`]). `Ok` says whether it is past the window,
    /// where the query is answered from the log without writing.
    pub fn check(&self, subject: &str, now_ms: i64, window: &TxWindow) -> Result<TxAge, Refused> {
        match crate::subjects::decision_query_sender(subject) {
            Some(sender) if sender == self.participant => {}
            Some(sender) => {
                return Err(Refused::new(
                    Code::WrongSender,
                    format!(
                        "the query names {} but was sent by {sender} (on {subject})",
                        self.participant
                    ),
                ))
            }
            None => {
                return Err(Refused::new(
                    Code::WrongSender,
                    format!("{subject:?} does not name a participant"),
                ))
            }
        }
        window.check_tx(self.tx, now_ms)
    }
}

/// Coordinator → participant: the answer to a [`DecisionQuery`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DecisionReply {
    /// The durable decision.
    Decided { tx: TxId, decision: Decision },
    /// The query was not answered; ask again later.
    Rejected { code: Code, message: String },
}

/// Receiver → sender, in place of the expected reply: the message was of a
/// kind, or a version of its kind, that the receiver does not speak.
/// Nothing was done. `speaks` lists every kind the receiver knows, with the
/// layout version it reads. Every implementation knows this message, so a
/// sender can add message kinds (batched prepares, say) and fall back to
/// the ones a receiver lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsupported {
    pub message: String,
    pub speaks: Vec<Speaks>,
}

/// One message kind a receiver knows, and the layout version it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Speaks {
    pub kind: u8,
    pub version: u16,
}

/// Every message kind this build knows, with its layout version.
pub fn speaks() -> Vec<Speaks> {
    fn of<M: Message>() -> Speaks {
        Speaks {
            kind: M::KIND,
            version: M::VERSION,
        }
    }
    vec![
        of::<Prepare>(),
        of::<Vote>(),
        of::<Decide>(),
        of::<DecideReply>(),
        of::<DecisionQuery>(),
        of::<DecisionReply>(),
        of::<Unsupported>(),
    ]
}

/// [`speaks`] as text, `kind:version` comma-separated (`1:2,2:1,...`): what
/// a service publishes as `twopc_speaks` in its `$SRV` metadata.
pub fn speaks_text() -> String {
    speaks()
        .iter()
        .map(|s| format!("{}:{}", s.kind, s.version))
        .collect::<Vec<_>>()
        .join(",")
}

impl Unsupported {
    /// The answer to a message that did not decode as [`DecodeError::Kind`]
    /// or [`DecodeError::Version`].
    pub fn to(err: &DecodeError) -> Unsupported {
        Unsupported {
            message: err.to_string(),
            speaks: speaks(),
        }
    }
}

/// A protocol message type with its one-byte kind tag.
pub trait Message: Serialize + DeserializeOwned {
    /// Unique per message type; never reused.
    const KIND: u8;
    /// The layout version of this kind's body: raised when the body
    /// changes, so an old receiver refuses the new layout instead of
    /// misreading it. (Kinds keep their own versions: a new kind does not
    /// change the others'.)
    const VERSION: u16;
    const NAME: &'static str;
    /// Checks the limits the type cannot express (identifier rules, caps);
    /// [`decode`] refuses a message that fails with [`DecodeError::Invalid`].
    /// `Err` says which field and why.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

macro_rules! message {
    ($t:ty, $kind:expr, $version:expr) => {
        message!($t, $kind, $version, |_m: &$t| Ok(()));
    };
    ($t:ty, $kind:expr, $version:expr, $validate:expr) => {
        impl Message for $t {
            const KIND: u8 = $kind;
            const VERSION: u16 = $version;
            const NAME: &'static str = stringify!($t);
            fn validate(&self) -> Result<(), String> {
                let check: fn(&$t) -> Result<(), String> = $validate;
                check(self)
            }
        }
    };
}
// Prepare's layout 1 carried a typed debit or reservation; 2 carries the
// client and an opaque op.
message!(Prepare, 1, 2, |m| {
    if m.op.len() > MAX_OP_BYTES {
        return Err(format!(
            "op is {} bytes; the limit is {MAX_OP_BYTES}",
            m.op.len()
        ));
    }
    Ok(())
});
message!(Vote, 2, 1);
message!(Decide, 3, 1);
message!(DecideReply, 4, 1);
message!(DecisionQuery, 5, 1);
message!(DecisionReply, 6, 1);
message!(Unsupported, 7, 1);

/// Why bytes are not a valid protocol message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("unsupported version {got} of {name} (this build reads version {speaks})")]
    Version {
        name: &'static str,
        got: u16,
        speaks: u16,
    },
    #[error("expected a {expected} message (kind {expected_kind}), got kind {got}")]
    Kind {
        expected: &'static str,
        expected_kind: u8,
        got: u8,
    },
    #[error("message does not decode: {0}")]
    Body(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// It decodes, but a field is outside the protocol's limits.
    #[error("message outside the protocol's limits: {0}")]
    Invalid(String),
}

impl DecodeError {
    /// Whether the sender speaks something this build does not (another
    /// kind where this one was expected, or another version of it): the
    /// receiver answers [`Unsupported`].
    pub fn is_unsupported(&self) -> bool {
        matches!(self, DecodeError::Version { .. } | DecodeError::Kind { .. })
    }
}

/// Encodes a message in its envelope: its layout version, its kind, its
/// body.
pub fn encode<M: Message>(msg: &M) -> Vec<u8> {
    let mut out = postcard::to_allocvec(&M::VERSION).expect("u16 encodes");
    out.push(M::KIND);
    // Serialising owned, in-memory protocol types into a Vec cannot fail.
    out.extend(postcard::to_allocvec(msg).expect("protocol message encodes"));
    out
}

/// The envelope's version and kind, without decoding the body.
pub fn peek(bytes: &[u8]) -> Option<(u16, u8)> {
    let (version, rest): (u16, _) = postcard::take_from_bytes(bytes).ok()?;
    Some((version, *rest.first()?))
}

/// Decodes a message, checking size, kind, version, that nothing trails
/// and the message's own limits ([`Message::validate`]).
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let (version, rest): (u16, _) =
        postcard::take_from_bytes(bytes).map_err(|e| DecodeError::Body(e.to_string()))?;
    let (&kind, rest) = rest
        .split_first()
        .ok_or_else(|| DecodeError::Body("missing kind".into()))?;
    if kind != M::KIND {
        return Err(DecodeError::Kind {
            expected: M::NAME,
            expected_kind: M::KIND,
            got: kind,
        });
    }
    if version != M::VERSION {
        return Err(DecodeError::Version {
            name: M::NAME,
            got: version,
            speaks: M::VERSION,
        });
    }
    let (msg, rest) =
        postcard::take_from_bytes(rest).map_err(|e| DecodeError::Body(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    M::validate(&msg).map_err(DecodeError::Invalid)?;
    Ok(msg)
}

#[cfg(test)]
mod golden {
    //! Golden bytes: a change here is a wire-format change. Raise the
    //! kind's VERSION instead of editing these (and add a vector in
    //! `protocol/vectors`, which every implementation's tests read).
    use super::*;

    fn tx() -> TxId {
        Uuid::from_bytes([
            0x01, 0x93, 0x00, 0x00, 0x00, 0x00, 0x70, 0x00, 0x80, 0x00, 0, 0, 0, 0, 0, 0x2a,
        ])
    }
    const TX_BYTES: [u8; 17] = [
        16, 0x01, 0x93, 0x00, 0x00, 0x00, 0x00, 0x70, 0x00, 0x80, 0x00, 0, 0, 0, 0, 0, 0x2a,
    ];

    fn check<M: Message + std::fmt::Debug + PartialEq>(msg: M, body: &[u8]) {
        let mut want = vec![M::VERSION as u8, M::KIND];
        want.extend_from_slice(body);
        assert_eq!(encode(&msg), want, "{} bytes changed", M::NAME);
        assert_eq!(decode::<M>(&want).unwrap(), msg);
    }

    fn with_tx(rest: &[u8]) -> Vec<u8> {
        let mut v = TX_BYTES.to_vec();
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn prepare() {
        let msg = Prepare {
            tx: tx(),
            client: ClientName::new("web").unwrap(),
            op: br#"{"a":1}"#.to_vec(),
        };
        let mut body = with_tx(&[3, b'w', b'e', b'b', 7]);
        body.extend_from_slice(br#"{"a":1}"#);
        check(msg, &body);
    }

    #[test]
    fn votes() {
        check(Vote::Yes, &[0]);
        check(
            Vote::No {
                code: Code::OutOfStock,
                message: "x".into(),
            },
            &[1, 1, 1, b'x'],
        );
    }

    #[test]
    fn decide() {
        let msg = Decide {
            tx: tx(),
            decision: Decision::Abort,
        };
        check(msg, &with_tx(&[1]));
    }

    #[test]
    fn decide_replies() {
        check(DecideReply::Ack, &[0]);
        check(
            DecideReply::Rejected {
                code: Code::Conflict,
                message: String::new(),
            },
            &[1, 15, 0],
        );
    }

    #[test]
    fn decision_query() {
        let msg = DecisionQuery {
            tx: tx(),
            participant: ParticipantName::new("w").unwrap(),
        };
        check(msg, &with_tx(&[1, b'w']));
    }

    #[test]
    fn decision_replies() {
        let mut body = vec![0];
        body.extend(with_tx(&[0]));
        check(
            DecisionReply::Decided {
                tx: tx(),
                decision: Decision::Commit,
            },
            &body,
        );
        check(
            DecisionReply::Rejected {
                code: Code::Busy,
                message: "b".into(),
            },
            &[1, 13, 1, b'b'],
        );
    }

    #[test]
    fn rejects_wrong_version_kind_trailing_and_garbage() {
        let good = encode(&Vote::Yes);
        let mut v2 = good.clone();
        v2[0] = 2;
        let err = decode::<Vote>(&v2).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Version {
                name: "Vote",
                got: 2,
                speaks: 1
            }
        );
        assert!(err.is_unsupported());
        assert_eq!(peek(&v2), Some((2, Vote::KIND)));
        assert!(matches!(
            decode::<Decide>(&good),
            Err(DecodeError::Kind { got: 2, .. })
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(decode::<Vote>(&trailing), Err(DecodeError::Trailing(1)));
        assert!(decode::<Prepare>(b"").is_err());
        assert!(decode::<Prepare>(b"{\"tx\":1}").is_err());
        assert!(matches!(
            decode::<Prepare>(&vec![1u8; MAX_MESSAGE_BYTES + 1]),
            Err(DecodeError::TooLarge(_))
        ));
    }
}

#[cfg(test)]
mod limits {
    use super::*;

    #[test]
    fn a_prepare_op_is_at_most_max_op_bytes() {
        let prepare = |n: usize| {
            decode::<Prepare>(&encode(&Prepare {
                tx: Uuid::from_u128(1),
                client: ClientName::new("web").unwrap(),
                op: vec![b'1'; n],
            }))
        };
        assert!(prepare(MAX_OP_BYTES).is_ok());
        assert!(matches!(
            prepare(MAX_OP_BYTES + 1),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn a_prepare_names_a_valid_client() {
        let mut bytes = encode(&Prepare {
            tx: Uuid::from_u128(1),
            client: ClientName::new("web").unwrap(),
            op: vec![],
        });
        // The client's first byte, after version, kind and the 17-byte id.
        bytes[2 + 17 + 1] = b'W';
        assert!(matches!(
            decode::<Prepare>(&bytes),
            Err(DecodeError::Body(_))
        ));
    }

    #[test]
    fn an_old_prepare_layout_is_unsupported_not_misread() {
        let mut bytes = encode(&Prepare {
            tx: Uuid::from_u128(1),
            client: ClientName::new("web").unwrap(),
            op: vec![],
        });
        bytes[0] = 1;
        let err = decode::<Prepare>(&bytes).unwrap_err();
        assert!(err.is_unsupported(), "{err}");
        let answer = Unsupported::to(&err);
        assert!(answer.speaks.contains(&Speaks {
            kind: 1,
            version: 2
        }));
        assert_eq!(decode::<Unsupported>(&encode(&answer)), Ok(answer));
    }

    #[test]
    fn a_transaction_is_dated_by_its_uuidv7_and_expires_after_the_window() {
        let w = TxWindow::new(1_000, 5_000, 500).unwrap();
        let tx = Uuid::now_v7();
        let t = started_at_ms(tx).unwrap();
        assert!((t - twopc_now()).abs() < 5_000);
        assert!(!w.expired(tx, t + 1_000));
        assert!(w.expired(tx, t + 1_001));
        assert!(
            w.expired(Uuid::from_u128(1), t),
            "not a UUIDv7: age unknown"
        );
        assert!(TxWindow::new(1_000, 1_500, 500).is_err());
        assert!(TxWindow::new(0, 5_000, 0).is_err());
    }

    /// A UUIDv7 made at `ms`.
    fn tx_at(ms: i64) -> TxId {
        uuid::Builder::from_unix_timestamp_millis(ms as u64, &[7; 10]).into_uuid()
    }

    const NOW: i64 = 1_700_000_000_000;

    fn refused(r: Result<TxAge, Refused>) -> Code {
        r.expect_err("refused").code
    }

    #[test]
    fn a_transaction_id_is_a_uuidv7_not_from_the_future() {
        let w = TxWindow::new(1_000, 5_000, 500).unwrap();
        let v4 = Uuid::from_bytes([
            0x01, 0x93, 0, 0, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 0x2a,
        ]);
        for bad in [Uuid::nil(), Uuid::max(), v4, Uuid::from_u128(1)] {
            assert_eq!(refused(w.check_tx(bad, NOW)), Code::BadTxId, "{bad}");
        }
        // A v7 layout with another variant is not an RFC 9562 UUIDv7.
        let mut b = *tx_at(NOW).as_bytes();
        b[8] = 0xc0;
        assert_eq!(refused(w.check_tx(Uuid::from_bytes(b), NOW)), Code::BadTxId);
        // Up to the tolerated skew ahead is fine; beyond it, refused.
        assert_eq!(w.check_tx(tx_at(NOW + 500), NOW), Ok(TxAge::Within));
        assert_eq!(refused(w.check_tx(tx_at(NOW + 501), NOW)), Code::TxInFuture);
        assert_eq!(
            refused(w.check_tx(tx_at(NOW + 3_600_000), NOW)),
            Code::TxInFuture
        );
        // Within the window, then past it: still valid, but expired.
        assert_eq!(w.check_tx(tx_at(NOW - 1_000), NOW), Ok(TxAge::Within));
        assert_eq!(w.check_tx(tx_at(NOW - 1_001), NOW), Ok(TxAge::Expired));
        assert_eq!(w.check_tx(tx_at(0), NOW), Ok(TxAge::Expired));
    }

    #[test]
    fn each_message_has_one_check_used_by_its_receiver() {
        let w = TxWindow::new(1_000, 5_000, 500).unwrap();
        let prepare = |tx| {
            Prepare {
                tx,
                client: ClientName::new("web").unwrap(),
                op: b"{}".to_vec(),
            }
            .check(NOW, &w)
        };
        assert_eq!(prepare(tx_at(NOW)), Ok(TxAge::Within));
        assert_eq!(prepare(tx_at(NOW - 2_000)), Ok(TxAge::Expired));
        assert_eq!(refused(prepare(Uuid::nil())), Code::BadTxId);
        assert_eq!(refused(prepare(tx_at(NOW + 3_600_000))), Code::TxInFuture);

        let decide = |tx, stored| {
            Decide {
                tx,
                decision: Decision::Abort,
            }
            .check(NOW, &w, stored)
        };
        for stored in [false, true] {
            assert_eq!(decide(tx_at(NOW), stored), Ok(TxAge::Within));
            assert_eq!(decide(tx_at(NOW - 2_000), stored), Ok(TxAge::Expired));
            assert_eq!(refused(decide(Uuid::from_u128(4), stored)), Code::BadTxId);
        }
        // From the future: no tombstone for it, but a stored branch is
        // decided whatever this participant's clock says.
        assert_eq!(refused(decide(tx_at(NOW + 501), false)), Code::TxInFuture);
        assert_eq!(decide(tx_at(NOW + 3_600_000), true), Ok(TxAge::Within));

        use crate::participant::{ORDER, WALLET};
        use crate::subjects::decision_query;
        let query = |tx, participant, subject: &str| {
            DecisionQuery { tx, participant }.check(subject, NOW, &w)
        };
        let from_wallet = decision_query(&WALLET);
        assert_eq!(query(tx_at(NOW), WALLET, &from_wallet), Ok(TxAge::Within));
        assert_eq!(
            query(tx_at(NOW - 2_000), WALLET, &from_wallet),
            Ok(TxAge::Expired)
        );
        let r = DecisionQuery {
            tx: tx_at(NOW),
            participant: ORDER,
        }
        .check(&from_wallet, NOW, &w)
        .unwrap_err();
        assert_eq!(r.code, Code::WrongSender);
        assert!(
            r.message.contains("order") && r.message.contains("wallet"),
            "{r}"
        );
        assert_eq!(
            refused(query(tx_at(NOW), WALLET, "twopc.decision")),
            Code::WrongSender
        );
        assert_eq!(
            refused(query(Uuid::nil(), WALLET, &from_wallet)),
            Code::BadTxId
        );
        assert_eq!(
            refused(query(tx_at(NOW + 501), WALLET, &from_wallet)),
            Code::TxInFuture
        );
    }

    fn twopc_now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    #[test]
    fn decision_query_names_a_participant_by_the_naming_rule() {
        // Built by hand: a `DecisionQuery` cannot hold a bad name.
        let q = |participant: &str| {
            let mut bytes = postcard::to_allocvec(&DecisionQuery::VERSION).unwrap();
            bytes.push(DecisionQuery::KIND);
            bytes.extend(postcard::to_allocvec(&(Uuid::from_u128(1), participant)).unwrap());
            decode::<DecisionQuery>(&bytes)
        };
        assert_eq!(q("wallet").unwrap().participant, crate::participant::WALLET);
        for bad in ["", "wal let", "twopc.>", "Wallet"] {
            assert!(matches!(q(bad), Err(DecodeError::Body(_))), "{bad:?}");
        }
    }
}
