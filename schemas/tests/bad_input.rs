//! Bad input, parsing only: every malformed, mistyped, out-of-range,
//! oversized or unknown-field public request, and every undecodable
//! protocol message, refused by the same `parse` / `decode` the services
//! call. The end-to-end side (`tests/bad_input.rs` at the workspace root)
//! keeps a few cases per subject to prove each service answers these
//! errors, changes nothing and keeps serving; the full tables live here.

use twopc_schemas::api::{
    ApiError, BalanceQuery, CreateProduct, CreateUser, PurchaseRequest, StockQuery, TxQuery,
    MAX_AMOUNT, MAX_QTY, MAX_REQUEST_BYTES,
};
use twopc_schemas::protocol::{
    self, Decide, DecideReply, Decision, DecisionQuery, Message, Prepare, TxId, Vote,
    MAX_MESSAGE_BYTES,
};
use twopc_schemas::Code;

/// A bad request: case name, payload, expected code, and a word the error
/// message must contain.
type Case = (String, Vec<u8>, Code, Option<&'static str>);

/// Runs `parse` on every case and asserts each is refused with its code and
/// a message (mentioning the hint, when given); all failures are reported
/// together.
fn assert_refused<T: std::fmt::Debug>(
    what: &str,
    parse: impl Fn(&[u8]) -> Result<T, ApiError>,
    cases: &[Case],
) {
    let mut failures = vec![];
    for (case, payload, code, hint) in cases {
        match parse(payload) {
            Ok(v) => failures.push(format!("{what} {case}: accepted as {v:?}")),
            Err(e) if e.code != *code => {
                failures.push(format!("{what} {case}: expected {code}, got {e}"))
            }
            Err(e) if e.message.trim().is_empty() => {
                failures.push(format!("{what} {case}: empty message"))
            }
            Err(e) => {
                if let Some(hint) = hint {
                    if !e.message.contains(hint) {
                        failures.push(format!(
                            "{what} {case}: message should mention {hint:?}: {e}"
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad {what} requests were not refused as expected:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn case(name: &str, payload: impl Into<Vec<u8>>, code: Code, hint: Option<&'static str>) -> Case {
    (name.to_owned(), payload.into(), code, hint)
}

fn purchase_json(user: &str, sku: &str, qty: u64, amount: u64) -> String {
    format!(r#"{{"user":"{user}","sku":"{sku}","qty":{qty},"amount":{amount}}}"#)
}

use Code::{InvalidRequest as Invalid, MalformedJson as Malformed, PayloadTooLarge as TooLarge};

#[test]
fn bad_purchases_are_refused_with_a_code_and_a_reason() {
    let base = |field: &str| format!(r#"{{"user":"alice","sku":"book-1","qty":1,{field}}}"#);
    let with_id = |id: &str| {
        format!(r#"{{"user":"alice","sku":"book-1","qty":1,"amount":1250,"request_id":{id}}}"#)
    };
    let valid = purchase_json("alice", "book-1", 1, 1_250);
    // A purchase that would be accepted if the size limit were not enforced.
    let padded_over = format!("{valid}{}", " ".repeat(5 * 1024 - valid.len()));
    let huge = format!("{valid}{}", " ".repeat(64 * 1024));
    let long_sku = "s".repeat(65);
    let long_id = format!("\"{}\"", "r".repeat(65));
    let cases = vec![
        case(
            "malformed JSON",
            br#"{"user":"alice","sku":"#.to_vec(),
            Malformed,
            Some("JSON"),
        ),
        case("not JSON at all", "buy me a book", Malformed, Some("JSON")),
        case(
            "invalid UTF-8",
            vec![0xff, 0xfe, 0x00, 0x7b],
            Malformed,
            Some("JSON"),
        ),
        case("empty payload", vec![], Malformed, Some("JSON")),
        case("JSON array", "[]", Invalid, None),
        case(
            "JSON array of the fields",
            r#"["alice","book-1",1,1250]"#,
            Invalid,
            None,
        ),
        case("JSON null", "null", Invalid, None),
        case("JSON string", r#""alice""#, Invalid, None),
        case("JSON number", "42", Invalid, None),
        case(
            "missing qty",
            r#"{"user":"alice","sku":"book-1","amount":1250}"#,
            Invalid,
            Some("qty"),
        ),
        case(
            "missing user",
            r#"{"sku":"book-1","qty":1,"amount":1250}"#,
            Invalid,
            Some("user"),
        ),
        case(
            "extra unknown field",
            base(r#""amount":1250,"coupon":"free""#),
            Invalid,
            Some("coupon"),
        ),
        case(
            "duplicate field",
            base(r#""amount":1250,"amount":1"#),
            Invalid,
            Some("amount"),
        ),
        // Ambiguous: committing either value would be wrong.
        case(
            "duplicate field, the last one a valid amount",
            base(r#""amount":1,"amount":1250"#),
            Invalid,
            Some("amount"),
        ),
        case(
            "duplicate user",
            r#"{"user":"carol","user":"alice","sku":"book-1","qty":1,"amount":1250}"#,
            Invalid,
            Some("user"),
        ),
        case(
            "amount float 2.5",
            base(r#""amount":2.5"#),
            Invalid,
            Some("2.5"),
        ),
        case(
            "amount float 1250.0",
            base(r#""amount":1250.0"#),
            Invalid,
            None,
        ),
        case(
            "amount exponent 1e3",
            base(r#""amount":1e3"#),
            Invalid,
            None,
        ),
        case(
            "amount string \"25\"",
            base(r#""amount":"25""#),
            Invalid,
            Some("string"),
        ),
        case("amount null", base(r#""amount":null"#), Invalid, None),
        case("amount bool", base(r#""amount":true"#), Invalid, None),
        case(
            "amount negative",
            base(r#""amount":-1250"#),
            Invalid,
            Some("-1250"),
        ),
        case(
            "amount zero",
            base(r#""amount":0"#),
            Invalid,
            Some("amount"),
        ),
        case(
            "amount overflowing u64",
            base(r#""amount":99999999999999999999999"#),
            Invalid,
            None,
        ),
        case(
            "amount u64::MAX",
            base(&format!(r#""amount":{}"#, u64::MAX)),
            Invalid,
            Some("amount"),
        ),
        case(
            "amount over MAX_AMOUNT",
            base(r#""amount":1000000000000000001"#),
            Invalid,
            Some("amount"),
        ),
        case(
            "qty zero",
            purchase_json("alice", "book-1", 0, 1_250),
            Invalid,
            Some("qty"),
        ),
        case(
            "qty negative",
            r#"{"user":"alice","sku":"book-1","qty":-1,"amount":1250}"#,
            Invalid,
            Some("-1"),
        ),
        case(
            "qty over 1_000_000",
            purchase_json("alice", "book-1", 1_000_001, 1_250),
            Invalid,
            Some("qty"),
        ),
        case(
            "qty over u32",
            purchase_json("alice", "book-1", 1 << 32, 1_250),
            Invalid,
            Some("qty"),
        ),
        case(
            "qty float",
            r#"{"user":"alice","sku":"book-1","qty":1.5,"amount":1250}"#,
            Invalid,
            None,
        ),
        case(
            "user empty",
            purchase_json("", "book-1", 1, 1_250),
            Invalid,
            Some("user"),
        ),
        case(
            "user with spaces",
            purchase_json("al ice", "book-1", 1, 1_250),
            Invalid,
            Some("user"),
        ),
        case(
            "user non-ASCII",
            purchase_json("ålice", "book-1", 1, 1_250),
            Invalid,
            Some("user"),
        ),
        case(
            "user a number",
            r#"{"user":7,"sku":"book-1","qty":1,"amount":1250}"#,
            Invalid,
            None,
        ),
        case(
            "sku 65 bytes",
            purchase_json("alice", &long_sku, 1, 1_250),
            Invalid,
            Some("sku"),
        ),
        case(
            "sku with a slash",
            purchase_json("alice", "book/1", 1, 1_250),
            Invalid,
            Some("sku"),
        ),
        case(
            "request_id empty",
            with_id(r#""""#),
            Invalid,
            Some("request_id"),
        ),
        case(
            "request_id with spaces",
            with_id(r#""order 42""#),
            Invalid,
            Some("request_id"),
        ),
        case(
            "request_id 65 bytes",
            with_id(&long_id),
            Invalid,
            Some("request_id"),
        ),
        case("request_id a number", with_id("42"), Invalid, None),
        case(
            "valid purchase padded to 5 KiB",
            padded_over,
            TooLarge,
            Some("limit"),
        ),
        case(
            "valid purchase padded to 64 KiB",
            huge,
            TooLarge,
            Some("limit"),
        ),
    ];
    assert_refused("shop.purchase", PurchaseRequest::parse, &cases);

    // The edges that are accepted: exactly the size limit, 64-byte names,
    // the largest quantity and amount.
    let at_limit = format!("{valid}{}", " ".repeat(MAX_REQUEST_BYTES - valid.len()));
    assert_eq!(at_limit.len(), MAX_REQUEST_BYTES);
    PurchaseRequest::parse(at_limit.as_bytes()).expect("a request at the size limit");
    let id = "k".repeat(64);
    let edge = format!(
        r#"{{"user":"{id}","sku":"{id}","qty":{MAX_QTY},"amount":{MAX_AMOUNT},"request_id":"{id}"}}"#
    );
    PurchaseRequest::parse(edge.as_bytes()).expect("64-byte ids, MAX_QTY, MAX_AMOUNT");
}

#[test]
fn bad_balance_and_stock_queries_are_refused() {
    let big = format!(r#"{{"user":"alice"}}{}"#, " ".repeat(MAX_REQUEST_BYTES));
    let balance = vec![
        case("truncated", "{\"user\":", Malformed, None),
        case("empty payload", "", Malformed, None),
        case("no user", "{}", Invalid, Some("user")),
        case("user a number", r#"{"user":5}"#, Invalid, None),
        case(
            "unknown field",
            r#"{"user":"alice","all":true}"#,
            Invalid,
            Some("all"),
        ),
        case(
            "user with a space",
            r#"{"user":"a b"}"#,
            Invalid,
            Some("user"),
        ),
        case("user empty", r#"{"user":""}"#, Invalid, Some("user")),
        case("JSON array", r#"["alice"]"#, Invalid, None),
        case("over the size limit", big, TooLarge, None),
    ];
    assert_refused("wallet.balance", BalanceQuery::parse, &balance);
    BalanceQuery::parse(br#"{"user":"alice"}"#).unwrap();

    let big_sku = format!(r#"{{"sku":"book-1"}}{}"#, " ".repeat(MAX_REQUEST_BYTES));
    let stock = vec![
        case("truncated", "[", Malformed, None),
        case("JSON array", "[]", Invalid, None),
        case("sku an array", r#"{"sku":["book-1"]}"#, Invalid, None),
        case(
            "unknown field",
            r#"{"sku":"book-1","price":1}"#,
            Invalid,
            Some("price"),
        ),
        case(
            "sku 65 bytes",
            format!(r#"{{"sku":"{}"}}"#, "s".repeat(65)),
            Invalid,
            Some("sku"),
        ),
        case("over the size limit", big_sku, TooLarge, None),
    ];
    assert_refused("order.stock", StockQuery::parse, &stock);
    StockQuery::parse(br#"{"sku":"book-1"}"#).unwrap();
}

#[test]
fn bad_user_and_product_creations_are_refused() {
    let users = vec![
        case("truncated", r#"{"user":"eve","balance":}"#, Malformed, None),
        case("no balance", r#"{"user":"eve"}"#, Invalid, Some("balance")),
        case(
            "balance negative",
            r#"{"user":"eve","balance":-100}"#,
            Invalid,
            Some("-100"),
        ),
        case(
            "balance float",
            r#"{"user":"eve","balance":2.5}"#,
            Invalid,
            Some("2.5"),
        ),
        case(
            "balance a string",
            r#"{"user":"eve","balance":"100"}"#,
            Invalid,
            Some("string"),
        ),
        case(
            "balance overflowing u64",
            r#"{"user":"eve","balance":99999999999999999999999}"#,
            Invalid,
            None,
        ),
        case(
            "balance over MAX_AMOUNT",
            r#"{"user":"eve","balance":1000000000000000001}"#,
            Invalid,
            Some("balance"),
        ),
        case(
            "unknown field",
            r#"{"user":"eve","balance":1,"admin":true}"#,
            Invalid,
            Some("admin"),
        ),
        case(
            "user with a space",
            r#"{"user":"e ve","balance":1}"#,
            Invalid,
            Some("user"),
        ),
        case(
            "user empty",
            r#"{"user":"","balance":1}"#,
            Invalid,
            Some("user"),
        ),
        case("JSON array", r#"["eve",100]"#, Invalid, None),
        case(
            "duplicate balance",
            r#"{"user":"eve","balance":0,"balance":1000}"#,
            Invalid,
            Some("balance"),
        ),
    ];
    assert_refused("wallet.users.create", CreateUser::parse, &users);
    CreateUser::parse(br#"{"user":"eve","balance":0}"#).unwrap();

    let products = vec![
        case(
            "truncated",
            r#"{"sku":"mug-1","price":100,"stock":5"#,
            Malformed,
            None,
        ),
        case(
            "price zero",
            r#"{"sku":"mug-1","price":0,"stock":5}"#,
            Invalid,
            Some("price"),
        ),
        case(
            "price negative",
            r#"{"sku":"mug-1","price":-100,"stock":5}"#,
            Invalid,
            Some("-100"),
        ),
        case(
            "price float",
            r#"{"sku":"mug-1","price":1.99,"stock":5}"#,
            Invalid,
            Some("1.99"),
        ),
        case(
            "price a string",
            r#"{"sku":"mug-1","price":"100","stock":5}"#,
            Invalid,
            Some("string"),
        ),
        case(
            "stock negative",
            r#"{"sku":"mug-1","price":100,"stock":-1}"#,
            Invalid,
            Some("-1"),
        ),
        case(
            "stock over MAX_STOCK",
            r#"{"sku":"mug-1","price":100,"stock":1000000001}"#,
            Invalid,
            Some("stock"),
        ),
        case(
            "no stock",
            r#"{"sku":"mug-1","price":100}"#,
            Invalid,
            Some("stock"),
        ),
        case(
            "sku with a space",
            r#"{"sku":"mug 1","price":100,"stock":5}"#,
            Invalid,
            Some("sku"),
        ),
        case(
            "unknown field",
            r#"{"sku":"mug-1","price":100,"stock":5,"tax":0}"#,
            Invalid,
            Some("tax"),
        ),
        case("JSON array", r#"["mug-1",100,5]"#, Invalid, None),
    ];
    assert_refused("order.products.create", CreateProduct::parse, &products);
    CreateProduct::parse(br#"{"sku":"mug-1","price":100,"stock":0}"#).unwrap();
}

#[test]
fn bad_transaction_queries_are_refused() {
    let fresh = TxId::now_v7().to_string();
    let cases = vec![
        case("truncated", "{\"tx\"", Malformed, None),
        case("not JSON", "tx", Malformed, None),
        case("empty payload", "", Malformed, None),
        case("not a uuid", r#"{"tx":"not-a-uuid"}"#, Invalid, Some("tx")),
        case("half a uuid", r#"{"tx":"0193-nope"}"#, Invalid, Some("tx")),
        case(
            "uuid-shaped, not hex",
            r#"{"tx":"zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"}"#,
            Invalid,
            Some("tx"),
        ),
        case("tx a number", r#"{"tx":42}"#, Invalid, None),
        case("tx null", r#"{"tx":null}"#, Invalid, None),
        case("no tx", "{}", Invalid, Some("tx")),
        case("JSON array", format!(r#"["{fresh}"]"#), Invalid, None),
        case(
            "unknown field",
            format!(r#"{{"tx":"{fresh}","verbose":true}}"#),
            Invalid,
            Some("verbose"),
        ),
        case(
            "over the size limit",
            format!(r#"{{"tx":"{fresh}"}}{}"#, " ".repeat(MAX_REQUEST_BYTES)),
            TooLarge,
            None,
        ),
    ];
    // shop.tx, wallet.tx and order.tx all parse with `TxQuery::parse`.
    assert_refused("shop.tx / <participant>.tx", TxQuery::parse, &cases);
    assert_eq!(
        TxQuery::parse(format!(r#"{{"tx":"{fresh}"}}"#).as_bytes())
            .unwrap()
            .to_string(),
        fresh
    );
}

/// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Payloads that are not a valid `M`, built around a valid one: garbage,
/// JSON, another version, another kind, trailing bytes, truncation, size.
fn garbage_for<M: Message>(valid: &M, json: &str, other_kind: Vec<u8>) -> Vec<(String, Vec<u8>)> {
    let good = protocol::encode(valid);
    let mut later = good.clone();
    later[0] = (M::VERSION + 1) as u8;
    let mut v0 = good.clone();
    v0[0] = 0;
    let mut trailing = good.clone();
    trailing.push(0);
    let truncated = good[..good.len() - 1].to_vec();
    let mut oversized = good.clone();
    oversized.resize(MAX_MESSAGE_BYTES + 1, 0);
    vec![
        ("empty payload".to_string(), vec![]),
        ("random bytes".into(), noise(0x5eed_0001, 48)),
        ("more random bytes".into(), noise(0x5eed_0002, 300)),
        ("version only".into(), vec![1]),
        ("JSON".into(), json.as_bytes().to_vec()),
        ("envelope of a later version".into(), later),
        ("envelope of version 0".into(), v0),
        ("envelope of another kind".into(), other_kind),
        ("valid message with a trailing byte".into(), trailing),
        ("valid message truncated".into(), truncated),
        (
            format!("valid message padded past {MAX_MESSAGE_BYTES} bytes"),
            oversized,
        ),
    ]
}

/// Every garbled variant of a valid message fails to decode, with the
/// error that names what is wrong where it is deterministic.
fn assert_undecodable<M: Message + std::fmt::Debug>(valid: &M, json: &str, other_kind: Vec<u8>) {
    use protocol::DecodeError as E;
    assert!(
        protocol::decode::<M>(&protocol::encode(valid)).is_ok(),
        "test bug: the valid {} does not decode",
        M::NAME
    );
    for (case, bytes) in garbage_for(valid, json, other_kind) {
        let e = match protocol::decode::<M>(&bytes) {
            Ok(m) => panic!("{} {case}: decodes as {m:?}", M::NAME),
            Err(e) => e,
        };
        let expected = match case.as_str() {
            "empty payload" | "version only" | "valid message truncated" => {
                matches!(e, E::Body(_))
            }
            "envelope of a later version" => {
                matches!(e, E::Version { got, .. } if got == M::VERSION + 1) && e.is_unsupported()
            }
            "envelope of version 0" => matches!(e, E::Version { got: 0, .. }),
            "envelope of another kind" => matches!(e, E::Kind { .. }),
            "valid message with a trailing byte" => e == E::Trailing(1),
            c if c.starts_with("valid message padded") => e == E::TooLarge(MAX_MESSAGE_BYTES + 1),
            _ => true, // random bytes and JSON: any refusal.
        };
        assert!(expected, "{} {case}: unexpected error {e:?}", M::NAME);
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn undecodable_protocol_messages_are_refused() {
    let tx = TxId::now_v7();
    let web = twopc_schemas::ClientName::new("web").unwrap();
    let prepare_wallet = Prepare {
        tx,
        client: web.clone(),
        op: br#"{"amount":1250,"user":"alice"}"#.to_vec(),
    };
    let prepare_order = Prepare {
        tx,
        client: web,
        op: br#"{"amount":1250,"qty":1,"sku":"book-1","user":"alice"}"#.to_vec(),
    };
    let decide = Decide {
        tx,
        decision: Decision::Abort,
    };
    let query = DecisionQuery {
        tx,
        participant: twopc_schemas::participant::WALLET,
    };
    let prepare_json =
        format!(r#"{{"tx":"{tx}","op":{{"Debit":{{"user":"alice","amount":1250}}}}}}"#);
    let decide_json = format!(r#"{{"tx":"{tx}","decision":"Abort"}}"#);
    let query_json = format!(r#"{{"tx":"{tx}","participant":"wallet"}}"#);

    // What twopc.wallet.prepare, twopc.order.prepare, twopc.*.decide and
    // twopc.decision.<participant> receive, garbled.
    assert_undecodable(&prepare_wallet, &prepare_json, protocol::encode(&Vote::Yes));
    assert_undecodable(&prepare_order, &prepare_json, protocol::encode(&decide));
    assert_undecodable(&decide, &decide_json, protocol::encode(&prepare_wallet));
    assert_undecodable(&decide, &decide_json, protocol::encode(&DecideReply::Ack));
    assert_undecodable(&query, &query_json, protocol::encode(&decide));
}
