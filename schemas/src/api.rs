//! The public JSON API: what `nats req shop.purchase '{...}'` sends and gets.
//!
//! Parsing is strict: unknown fields, wrong types, floats for integers,
//! negative or out-of-range numbers and malformed identifiers are all
//! refused with an [`ApiError`] naming the problem. Money is integer minor
//! units (cents).

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::Code;

/// Largest public request accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024;
/// Largest quantity in one purchase.
pub const MAX_QTY: u64 = 1_000_000;
/// Largest amount (minor units) in one purchase, balance or price. Well
/// inside i64 so that sums in SQLite cannot overflow. Protocol messages get
/// the same limits ([`crate::tx::DebitOp::validate`], [`crate::tx::ReserveOp::validate`]).
pub const MAX_AMOUNT: u64 = 1_000_000_000_000_000;
/// Largest stock of one product.
pub const MAX_STOCK: u64 = 1_000_000_000;
/// Longest user name, sku or request id, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// `{"error": {"code": ..., "message": ...}}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: ApiError,
}

/// A refused request: a code to match on and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: Code,
    pub message: String,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(Code::InvalidRequest, message)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&ErrorReply {
            error: self.clone(),
        })
        .expect("error reply serialises")
    }
}

/// Parses a JSON request strictly: size limit, syntax, then types.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    parse_json_limited(bytes, MAX_REQUEST_BYTES)
}

/// [`parse_json`] with another size limit.
pub fn parse_json_limited<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, ApiError> {
    if bytes.len() > limit {
        return Err(ApiError::new(
            Code::PayloadTooLarge,
            format!("request is {} bytes; the limit is {limit}", bytes.len()),
        ));
    }
    // serde would also accept a struct as a JSON array of its fields in
    // order; a request is an object with named fields, nothing else. (Not
    // parsed through `serde_json::Value`, which would keep the last of two
    // repeated keys instead of refusing them.)
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => ApiError::invalid("request must be a JSON object"),
                Err(e) => ApiError::new(
                    Code::MalformedJson,
                    format!("request is not valid JSON: {e}"),
                ),
            },
        );
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiError::new(
                Code::MalformedJson,
                format!("request is not valid JSON: {e}"),
            ),
            Category::Data => ApiError::invalid(format!("invalid request: {e}")),
        }
    })
}

/// Checks a user name, sku or request id: 1–64 bytes of `[A-Za-z0-9._:@-]`.
pub fn check_id(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > MAX_ID_BYTES {
        return Err(ApiError::invalid(format!(
            "{field} must be 1 to {MAX_ID_BYTES} bytes long"
        )));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@'))
    {
        return Err(ApiError::invalid(format!(
            "{field} may contain only letters, digits and . _ - : @"
        )));
    }
    Ok(())
}

/// Checks that `value` is within `min..=max`.
pub fn check_range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ApiError> {
    if value < min || value > max {
        return Err(ApiError::invalid(format!(
            "{field} must be between {min} and {max}, got {value}"
        )));
    }
    Ok(())
}

/// `shop.purchase` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    pub user: String,
    pub sku: String,
    pub qty: u64,
    /// Total in minor units; must equal price × qty at the order service.
    pub amount: u64,
    /// Client key that makes the purchase idempotent: a retry with the same
    /// id gets the first outcome and is never charged twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl PurchaseRequest {
    /// Parses and validates a purchase.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let req: PurchaseRequest = parse_json(bytes)?;
        check_id("user", &req.user)?;
        check_id("sku", &req.sku)?;
        check_range("qty", req.qty, 1, MAX_QTY)?;
        check_range("amount", req.amount, 1, MAX_AMOUNT)?;
        if let Some(id) = &req.request_id {
            check_id("request_id", id)?;
        }
        Ok(req)
    }
}

/// `"committed"` or `"aborted"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Committed,
    Aborted,
}

/// Why a transaction aborted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortReason {
    /// The participant that refused, or `"coordinator"`.
    pub participant: String,
    pub code: Code,
    pub message: String,
}

/// The reply to a transaction (`shop.<client>.transaction`) or a purchase
/// (`shop.<client>.purchase`, which is one transaction type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxReply {
    pub tx: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<AbortReason>,
    /// True when every participant acknowledged the decision before this
    /// reply; false when delivery still goes on in the background (the
    /// decision is durable either way).
    pub delivered: bool,
    /// True when this reply repeats the outcome of an earlier request with
    /// the same `request_id`.
    #[serde(default)]
    pub duplicate: bool,
}

/// A purchase's reply is a transaction's.
pub type PurchaseReply = TxReply;

/// `{"user": ...}` for `wallet.balance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceQuery {
    pub user: String,
}

impl BalanceQuery {
    /// Parses and validates a balance query.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let q: BalanceQuery = parse_json(bytes)?;
        check_id("user", &q.user)?;
        Ok(q)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub user: String,
    /// Settled balance, minor units.
    pub balance: u64,
    /// Sum of holds of prepared, undecided transactions.
    pub held: u64,
    /// `balance - held`: what a new purchase can spend.
    pub available: u64,
}

/// `{"user": ..., "balance": ...}` for `wallet.users.create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub user: String,
    pub balance: u64,
}

impl CreateUser {
    /// Parses and validates a user creation.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let req: CreateUser = parse_json(bytes)?;
        req.validate()?;
        Ok(req)
    }

    pub fn validate(&self) -> Result<(), ApiError> {
        check_id("user", &self.user)?;
        check_range("balance", self.balance, 0, MAX_AMOUNT)
    }
}

/// `{"sku": ...}` for `order.stock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockQuery {
    pub sku: String,
}

impl StockQuery {
    /// Parses and validates a stock query.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let q: StockQuery = parse_json(bytes)?;
        check_id("sku", &q.sku)?;
        Ok(q)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    pub sku: String,
    /// Unit price, minor units.
    pub price: u64,
    /// Units on hand (reserved ones included).
    pub stock: u64,
    /// Units reserved by prepared, undecided transactions.
    pub reserved: u64,
    /// `stock - reserved`.
    pub available: u64,
}

/// `{"sku": ..., "price": ..., "stock": ...}` for `order.products.create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProduct {
    pub sku: String,
    pub price: u64,
    pub stock: u64,
}

impl CreateProduct {
    /// Parses and validates a product creation.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let req: CreateProduct = parse_json(bytes)?;
        req.validate()?;
        Ok(req)
    }

    pub fn validate(&self) -> Result<(), ApiError> {
        check_id("sku", &self.sku)?;
        check_range("price", self.price, 1, MAX_AMOUNT)?;
        check_range("stock", self.stock, 0, MAX_STOCK)
    }
}

/// `{"tx": ...}` for `shop.tx` and `<participant>.tx`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxQuery {
    pub tx: String,
}

impl TxQuery {
    pub fn parse(bytes: &[u8]) -> Result<uuid::Uuid, ApiError> {
        let q: TxQuery = parse_json(bytes)?;
        uuid::Uuid::parse_str(&q.tx)
            .map_err(|e| ApiError::invalid(format!("tx is not a transaction id: {e}")))
    }
}

/// A participant's view of one transaction (`<participant>.tx`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchStatus {
    pub tx: String,
    pub participant: String,
    /// `prepared`, `committed`, `aborted` or `unknown`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Code>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<serde_json::Value>,
    pub updated_at_ms: Option<i64>,
}

/// The coordinator's view of one transaction (`shop.tx`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxStatus {
    pub tx: String,
    /// `in_progress`, `committed`, `aborted`, or `unknown` (no record: by
    /// presumed abort such a transaction can never commit).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The client that submitted it (absent for a presumed abort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Each participant and its op (empty for a presumed abort).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches: Vec<crate::tx::Branch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<AbortReason>,
    /// Each participant's vote.
    #[serde(default)]
    pub votes: Vec<VoteSummary>,
    /// Participants the decision must reach, and which acknowledged it.
    #[serde(default)]
    pub deliveries: Vec<Delivery>,
    /// Delivery rounds so far (1 when everyone acknowledged at once).
    #[serde(default)]
    pub delivery_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at_ms: Option<i64>,
}

impl TxStatus {
    /// The status of a transaction without a record: `unknown` (by presumed
    /// abort it can never commit), and what a client reads of another
    /// client's transaction.
    pub fn unknown(tx: String) -> TxStatus {
        TxStatus {
            tx,
            state: "unknown".into(),
            request_id: None,
            client: None,
            branches: vec![],
            reason: None,
            votes: vec![],
            deliveries: vec![],
            delivery_attempts: 0,
            decided_at_ms: None,
            completed_at_ms: None,
        }
    }
}

/// One participant's phase-1 answer, as the coordinator saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteSummary {
    pub participant: String,
    /// `yes`, `no`, `timeout`, `no_responders` or `garbled`.
    pub vote: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Code>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub participant: String,
    pub acked: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> ApiError {
        PurchaseRequest::parse(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn accepts_a_purchase_as_the_nats_cli_sends_it() {
        let req = PurchaseRequest::parse(
            br#"{"user": "alice", "sku": "book-1", "qty": 2, "amount": 2500, "request_id": "k1"}"#,
        )
        .unwrap();
        assert_eq!(req.qty, 2);
        assert_eq!(req.request_id.as_deref(), Some("k1"));
        // From a pipe the CLI sends a trailing newline.
        PurchaseRequest::parse(b"{\"user\":\"a\",\"sku\":\"b\",\"qty\":1,\"amount\":1}\n").unwrap();
    }

    #[test]
    fn refuses_bad_purchases_with_codes() {
        assert_eq!(err("{").code, Code::MalformedJson);
        assert_eq!(err("").code, Code::MalformedJson);
        assert_eq!(err("[]").code, Code::InvalidRequest);
        assert_eq!(err(r#"["a","b",1,1]"#).code, Code::InvalidRequest);
        assert_eq!(err("42").code, Code::InvalidRequest);
        assert_eq!(
            err(r#"{"user":"a","sku":"b","qty":1,"amount":1,"amount":5}"#).code,
            Code::InvalidRequest
        );
        let base = |f: &str| format!(r#"{{"user":"a","sku":"b","qty":1,{f}}}"#);
        for bad in [
            r#""amount":2.5"#,
            r#""amount":"25""#,
            r#""amount":-1"#,
            r#""amount":0"#,
            r#""amount":99999999999999999999999"#,
            r#""amount":1e3"#,
            r#""amount":null"#,
            r#""amount":1,"extra":true"#,
        ] {
            assert_eq!(err(&base(bad)).code, Code::InvalidRequest, "{bad}");
        }
        assert_eq!(
            err(r#"{"user":"a","sku":"b","qty":0,"amount":1}"#).code,
            Code::InvalidRequest
        );
        assert_eq!(
            err(r#"{"user":"a","sku":"b","qty":1000001,"amount":1}"#).code,
            Code::InvalidRequest
        );
        assert_eq!(
            err(r#"{"user":"","sku":"b","qty":1,"amount":1}"#).code,
            Code::InvalidRequest
        );
        assert_eq!(
            err(r#"{"user":"a b","sku":"b","qty":1,"amount":1}"#).code,
            Code::InvalidRequest
        );
        assert_eq!(
            err(r#"{"sku":"b","qty":1,"amount":1}"#).code,
            Code::InvalidRequest
        );
        let huge = format!(r#"{{"user":"{}"}}"#, "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(err(&huge).code, Code::PayloadTooLarge);
    }

    #[test]
    fn error_reply_shape() {
        let json = ApiError::new(Code::Busy, "later").to_json();
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"{"error":{"code":"busy","message":"later"}}"#
        );
    }
}

/// Most entries of each list an in-doubt listing (`shop.in_doubt`,
/// `<participant>.in_doubt`) returns, oldest first; `truncated` says that
/// more exist. One reply stays far below the NATS payload limit, and a
/// flood of in-doubt transactions cannot make one listing unbounded work.
pub const MAX_IN_DOUBT_LISTED: usize = 1_000;

/// `shop.in_doubt`: what the coordinator has not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorInDoubt {
    /// Transactions in phase 1 (no decision yet), at most
    /// [`MAX_IN_DOUBT_LISTED`].
    pub in_progress: Vec<String>,
    /// Recorded decisions some participant has not acknowledged, oldest
    /// first, at most [`MAX_IN_DOUBT_LISTED`].
    pub undelivered: Vec<Undelivered>,
    /// True when either list had more entries than it shows.
    #[serde(default)]
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undelivered {
    pub tx: String,
    pub decision: String,
    pub pending: Vec<String>,
    pub decided_at_ms: i64,
    /// Participants that answered this decision with a refusal (since this
    /// coordinator started). Delivery goes on, with capped backoff; a
    /// participant that contradicts a recorded decision needs an operator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_by: Vec<Refusal>,
}

/// A participant's refusals of one decision delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub participant: String,
    /// The last refusal's code and message.
    pub code: Code,
    pub message: String,
    /// Refusals in a row.
    pub times: u32,
}

/// `<participant>.in_doubt`: prepared branches awaiting a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantInDoubt {
    pub participant: String,
    /// Prepared branches, oldest first, at most [`MAX_IN_DOUBT_LISTED`].
    pub prepared: Vec<PreparedBranch>,
    /// True when more branches are prepared than `prepared` shows.
    #[serde(default)]
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedBranch {
    pub tx: String,
    pub prepared_at_ms: i64,
}
