//! Generic transactions: branches at any participants, each carrying that
//! participant's own operation, opaque to the coordinator.
//!
//! A client submits `{"branches": [{"participant": "wallet", "op": {...}},
//! ...], "request_id": "..."}` on `shop.<client>.transaction`
//! ([`TxSubmit`]). Each `op` is any JSON value up to [`MAX_OP_BYTES`]; the
//! coordinator keeps it in canonical form ([`Op`]: keys sorted, no
//! whitespace, a repeated key refused), so a retry written differently is
//! the same transaction, and hands the participant exactly those bytes in
//! its prepare. The purchase (`shop.<client>.purchase`) is one transaction
//! type: [`purchase`] turns it into two branches.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::api::{
    check_id, check_range, parse_json_limited, ApiError, PurchaseRequest, MAX_AMOUNT, MAX_QTY,
};
use crate::{ClientName, Code, ParticipantName};

/// Most branches in one transaction.
pub const MAX_BRANCHES: usize = 8;
/// Largest operation of one branch, in bytes of canonical JSON.
pub const MAX_OP_BYTES: usize = 1024;
/// Largest transaction request accepted, in bytes.
pub const MAX_TX_REQUEST_BYTES: usize = 16 * 1024;

/// One participant's operation: a JSON value in canonical form (object keys
/// sorted, no whitespace), at most [`MAX_OP_BYTES`]. Two ops are equal when
/// their canonical forms are.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Op(String);

impl Op {
    /// Canonicalises a JSON value.
    pub fn new(value: &Value) -> Result<Op, String> {
        let s = serde_json::to_string(value).expect("a JSON value serialises");
        if s.len() > MAX_OP_BYTES {
            return Err(format!(
                "op is {} bytes of canonical JSON; the limit is {MAX_OP_BYTES}",
                s.len()
            ));
        }
        Ok(Op(s))
    }

    /// Parses JSON text (refusing repeated keys) and canonicalises it.
    pub fn parse(bytes: &[u8]) -> Result<Op, String> {
        let v: Strict = serde_json::from_slice(bytes).map_err(|e| format!("op: {e}"))?;
        Op::new(&v.0)
    }

    /// The canonical JSON text: what the participant's prepare carries.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The op as a JSON value.
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.0).expect("an op is JSON")
    }

    /// The op of a typed operation (its JSON form, canonicalised).
    pub fn of<T: Serialize>(op: &T) -> Result<Op, String> {
        Op::new(&serde_json::to_value(op).map_err(|e| e.to_string())?)
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// In JSON an op is the value itself.
impl Serialize for Op {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Op {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Strict::deserialize(d)?;
        Op::new(&v.0).map_err(de::Error::custom)
    }
}

/// A JSON value whose objects may not repeat a key (`serde_json::Value`
/// would keep the last one silently).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(n)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = vec![];
        while let Some(Strict(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(de::Error::custom(format!("key {k:?} appears twice")));
            }
            let Strict(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

/// One participant's part of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Branch {
    pub participant: ParticipantName,
    pub op: Op,
}

/// `shop.<client>.transaction` request: the branches, and the client's
/// idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxSubmit {
    pub branches: Vec<Branch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl TxSubmit {
    /// Parses and validates a transaction request: 1 to [`MAX_BRANCHES`]
    /// branches, each participant named once ([`check_branches`]).
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let req: TxSubmit = parse_json_limited(bytes, MAX_TX_REQUEST_BYTES)?;
        check_branches(&req.branches)?;
        if let Some(id) = &req.request_id {
            check_id("request_id", id)?;
        }
        Ok(req)
    }
}

/// A transaction's branches are 1 to [`MAX_BRANCHES`], each at another
/// participant. Two operations at one participant are one branch whose op
/// carries both: a participant prepares, commits and aborts a transaction
/// once, and keys its branch log by transaction id.
pub fn check_branches(branches: &[Branch]) -> Result<(), ApiError> {
    if branches.is_empty() || branches.len() > MAX_BRANCHES {
        return Err(ApiError::invalid(format!(
            "a transaction has 1 to {MAX_BRANCHES} branches, got {}",
            branches.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for b in branches {
        if !seen.insert(&b.participant) {
            return Err(ApiError::invalid(format!(
                "participant {} is named twice: one branch per participant (put both \
                 operations in one op)",
                b.participant
            )));
        }
    }
    Ok(())
}

/// A transaction as the coordinator runs it: who asked, the branches, and
/// the request id (scoped to the client by the coordinator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    pub client: ClientName,
    pub branches: Vec<Branch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl Transaction {
    /// Whether `other` is the same transaction (a retry): the same client
    /// and the same branches in the same order, ops compared canonically.
    pub fn same_as(&self, other: &Transaction) -> bool {
        self.client == other.client && self.branches == other.branches
    }

    /// The participants, in branch order.
    pub fn participants(&self) -> Vec<ParticipantName> {
        self.branches
            .iter()
            .map(|b| b.participant.clone())
            .collect()
    }
}

/// Which participants each client may name in a transaction. A client
/// that is not listed may name none; `*` stands for every participant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(BTreeMap<ClientName, Option<Vec<ParticipantName>>>);

impl Grants {
    /// Every listed client may name every participant.
    pub fn allow_all(clients: impl IntoIterator<Item = ClientName>) -> Grants {
        Grants(clients.into_iter().map(|c| (c, None)).collect())
    }

    /// Parses `web=wallet,order;ops=*` (the `TWOPC_CLIENT_GRANTS` form).
    pub fn parse(s: &str) -> Result<Grants, String> {
        let mut out = BTreeMap::new();
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (client, names) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected <client>=<participant>,..."))?;
            let client = ClientName::new(client.trim())?;
            let names = names.trim();
            let grant = if names == "*" {
                None
            } else {
                Some(
                    names
                        .split(',')
                        .map(|n| ParticipantName::new(n.trim()).map_err(|e| e.to_string()))
                        .collect::<Result<Vec<_>, _>>()?,
                )
            };
            out.insert(client, grant);
        }
        Ok(Grants(out))
    }

    /// Adds (or replaces) one client's grant; `None` is every participant.
    pub fn grant(&mut self, client: ClientName, participants: Option<Vec<ParticipantName>>) {
        self.0.insert(client, participants);
    }

    /// Checks that `client` may name `participant` (`forbidden` otherwise).
    pub fn check(
        &self,
        client: &ClientName,
        participant: &ParticipantName,
    ) -> Result<(), ApiError> {
        match self.0.get(client) {
            Some(None) => Ok(()),
            Some(Some(list)) if list.contains(participant) => Ok(()),
            _ => Err(ApiError::new(
                Code::Forbidden,
                format!("client {client} may not name participant {participant}"),
            )),
        }
    }
}

impl fmt::Display for Grants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (c, g) in &self.0 {
            if !first {
                f.write_str(";")?;
            }
            first = false;
            match g {
                None => write!(f, "{c}=*")?,
                Some(list) => {
                    let names: Vec<&str> = list.iter().map(|p| p.as_str()).collect();
                    write!(f, "{c}={}", names.join(","))?
                }
            }
        }
        Ok(())
    }
}

/// The wallet's operation in a purchase: hold, then debit, `amount` of
/// `user`'s balance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebitOp {
    pub user: String,
    pub amount: u64,
}

/// The order service's operation in a purchase: reserve `qty` of `sku`
/// for `user` at a total of `amount` (price × qty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveOp {
    pub user: String,
    pub sku: String,
    pub qty: u64,
    pub amount: u64,
}

impl DebitOp {
    /// The public API's limits: `user` as [`check_id`], `amount` in
    /// `1..=MAX_AMOUNT`. `Err` names the field.
    pub fn validate(&self) -> Result<(), String> {
        check_id("user", &self.user)
            .and_then(|()| check_range("amount", self.amount, 1, MAX_AMOUNT))
            .map_err(|e| e.message)
    }
}

impl ReserveOp {
    /// The public API's limits: identifiers as [`check_id`], `qty` in
    /// `1..=MAX_QTY`, `amount` in `1..=MAX_AMOUNT`. `Err` names the field.
    pub fn validate(&self) -> Result<(), String> {
        check_id("user", &self.user)
            .and_then(|()| check_id("sku", &self.sku))
            .and_then(|()| check_range("qty", self.qty, 1, MAX_QTY))
            .and_then(|()| check_range("amount", self.amount, 1, MAX_AMOUNT))
            .map_err(|e| e.message)
    }
}

/// The purchase as a transaction: a debit at the wallet and a reservation
/// at the order service, in that order.
pub fn purchase(client: &ClientName, req: &PurchaseRequest) -> Transaction {
    let debit = DebitOp {
        user: req.user.clone(),
        amount: req.amount,
    };
    let reserve = ReserveOp {
        user: req.user.clone(),
        sku: req.sku.clone(),
        qty: req.qty,
        amount: req.amount,
    };
    Transaction {
        client: client.clone(),
        branches: vec![
            Branch {
                participant: crate::participant::WALLET,
                op: Op::of(&debit).expect("a validated debit is within the op limit"),
            },
            Branch {
                participant: crate::participant::ORDER,
                op: Op::of(&reserve).expect("a validated reservation is within the op limit"),
            },
        ],
        request_id: req.request_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(s: &str) -> Op {
        Op::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn an_op_is_canonical_json() {
        assert_eq!(
            op(r#"{ "b": 1, "a": {"y": [1, 2], "x": "s"} }"#).as_str(),
            r#"{"a":{"x":"s","y":[1,2]},"b":1}"#
        );
        assert_eq!(op(r#"{"a":1,"b":2}"#), op("{\n\"b\" : 2 , \"a\":1}"));
        assert_ne!(op(r#"{"a":1}"#), op(r#"{"a":"1"}"#));
    }

    #[test]
    fn an_op_refuses_repeated_keys_and_size() {
        assert!(Op::parse(br#"{"a":1,"a":2}"#)
            .unwrap_err()
            .contains("twice"));
        assert!(Op::parse(br#"{"x":{"a":1,"a":1}}"#).is_err());
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_OP_BYTES));
        assert!(Op::parse(big.as_bytes()).unwrap_err().contains("limit"));
        assert!(Op::parse(b"{").is_err());
    }

    #[test]
    fn a_submission_written_differently_is_the_same_transaction() {
        let a = TxSubmit::parse(
            br#"{"branches":[{"participant":"wallet","op":{"user":"al","amount":3}}],"request_id":"k"}"#,
        )
        .unwrap();
        let b = TxSubmit::parse(
            b"{ \"request_id\": \"k\",\n \"branches\": [ { \"op\": { \"amount\": 3, \"user\": \"al\" }, \"participant\": \"wallet\" } ] }",
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_submissions_are_refused_with_codes() {
        let err = |s: &str| TxSubmit::parse(s.as_bytes()).unwrap_err();
        assert_eq!(err("{").code, Code::MalformedJson);
        assert_eq!(err(r#"{"branches":[]}"#).code, Code::InvalidRequest);
        assert_eq!(
            err(r#"{"branches":[{"participant":"wallet"}]}"#).code,
            Code::InvalidRequest
        );
        assert_eq!(
            err(r#"{"branches":[{"participant":"Bad Name","op":1}]}"#).code,
            Code::InvalidRequest
        );
        assert_eq!(
            err(r#"{"branches":[{"participant":"w","op":1},{"participant":"w","op":2}]}"#).code,
            Code::InvalidRequest
        );
        assert_eq!(
            err(r#"{"branches":[{"participant":"w","op":1}],"extra":1}"#).code,
            Code::InvalidRequest
        );
        assert_eq!(
            err(r#"{"branches":[{"participant":"w","op":{"a":1,"a":2}}]}"#).code,
            Code::InvalidRequest
        );
        let nine: Vec<String> = (0..9)
            .map(|i| format!(r#"{{"participant":"p{i}","op":1}}"#))
            .collect();
        assert_eq!(
            err(&format!(r#"{{"branches":[{}]}}"#, nine.join(","))).code,
            Code::InvalidRequest
        );
        let huge = format!(
            r#"{{"branches":[],"x":"{}"}}"#,
            "a".repeat(MAX_TX_REQUEST_BYTES)
        );
        assert_eq!(err(&huge).code, Code::PayloadTooLarge);
    }

    #[test]
    fn grants_name_what_each_client_may_name() {
        let g = Grants::parse("web=wallet,order; ops=*").unwrap();
        let web = ClientName::new("web").unwrap();
        let ops = ClientName::new("ops").unwrap();
        let other = ClientName::new("other").unwrap();
        let p = |s: &str| ParticipantName::new(s).unwrap();
        assert!(g.check(&web, &p("wallet")).is_ok());
        assert_eq!(
            g.check(&web, &p("shipping")).unwrap_err().code,
            Code::Forbidden
        );
        assert!(g.check(&ops, &p("shipping")).is_ok());
        assert_eq!(
            g.check(&other, &p("wallet")).unwrap_err().code,
            Code::Forbidden
        );
        assert_eq!(Grants::parse(&g.to_string()).unwrap(), g);
        assert!(Grants::parse("web").is_err());
        assert!(Grants::parse("web=Bad Name").is_err());
    }

    #[test]
    fn a_purchase_is_a_debit_and_a_reservation() {
        let req = PurchaseRequest::parse(
            br#"{"user":"al","sku":"b","qty":2,"amount":5,"request_id":"k"}"#,
        )
        .unwrap();
        let t = purchase(&ClientName::new("web").unwrap(), &req);
        assert_eq!(
            t.participants(),
            vec![crate::participant::WALLET, crate::participant::ORDER]
        );
        assert_eq!(t.branches[0].op.as_str(), r#"{"amount":5,"user":"al"}"#);
        assert_eq!(
            t.branches[1].op.as_str(),
            r#"{"amount":5,"qty":2,"sku":"b","user":"al"}"#
        );
    }

    fn debit(user: &str, amount: u64) -> DebitOp {
        DebitOp {
            user: user.into(),
            amount,
        }
    }
    fn reserve(user: &str, sku: &str, qty: u64, amount: u64) -> ReserveOp {
        ReserveOp {
            user: user.into(),
            sku: sku.into(),
            qty,
            amount,
        }
    }

    #[test]
    fn purchase_ops_at_the_edges_of_the_limits_are_valid() {
        let long = "a".repeat(crate::api::MAX_ID_BYTES);
        for op in [
            debit("a", 1),
            debit("A.b_c-d:e@f0", MAX_AMOUNT),
            debit(&long, 1),
        ] {
            assert_eq!(op.validate(), Ok(()), "{op:?}");
        }
        for op in [
            reserve("a", "b", 1, 1),
            reserve(&long, &long, MAX_QTY, MAX_AMOUNT),
        ] {
            assert_eq!(op.validate(), Ok(()), "{op:?}");
        }
    }

    #[test]
    fn purchase_ops_outside_the_limits_are_refused_naming_the_field() {
        let long = "a".repeat(crate::api::MAX_ID_BYTES + 1);
        let past_i64 = i64::MAX as u64 + 1;
        for (op, field) in [
            (debit("a", 0), "amount"),
            (debit("a", MAX_AMOUNT + 1), "amount"),
            (debit("a", past_i64), "amount"),
            (debit("a", u64::MAX), "amount"),
            (debit("", 1), "user"),
            (debit("a b", 1), "user"),
            (debit("a\n", 1), "user"),
            (debit("é", 1), "user"),
            (debit(&long, 1), "user"),
        ] {
            let err = op.validate().expect_err(&format!("{op:?}"));
            assert!(err.starts_with(field), "{op:?}: {err}");
        }
        for (op, field) in [
            (reserve("a", "b", 0, 1), "qty"),
            (reserve("a", "b", MAX_QTY + 1, 1), "qty"),
            (reserve("a", "b", u64::MAX, 1), "qty"),
            (reserve("a", "b", 1, 0), "amount"),
            (reserve("a", "b", 1, past_i64), "amount"),
            (reserve("a", "b", 1, u64::MAX), "amount"),
            (reserve("", "b", 1, 1), "user"),
            (reserve("a", "", 1, 1), "sku"),
            (reserve("a", "b/c", 1, 1), "sku"),
            (reserve("a", &long, 1, 1), "sku"),
        ] {
            let err = op.validate().expect_err(&format!("{op:?}"));
            assert!(err.starts_with(field), "{op:?}: {err}");
        }
    }
}
