//! Bad input end to end: malformed, mistyped, out-of-range, oversized and
//! unknown public requests, undecodable internal protocol messages, and
//! forged or replayed protocol messages. Each gets a clear error reply (or a
//! no vote / rejection plus a logged warning on internal subjects), changes
//! nothing, and the service keeps serving.

mod harness;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use harness::{tx_id, Options, System, PURCHASE};
use twopc::check::{Snapshot, Told};
use twopc::launcher::Kind;
use twopc_schemas::api::{Outcome, MAX_REQUEST_BYTES};
use twopc_schemas::protocol::{
    self, Decide, DecideReply, Decision, DecisionQuery, DecisionReply, Message, Prepare, TxId,
    Unsupported, Vote, MAX_MESSAGE_BYTES,
};
use twopc_schemas::{participant, subjects, BranchState, ClientName, Code, ParticipantName};

/// Users and products, the part of the state bad input must not touch.
type Resources = (
    BTreeMap<String, (i64, i64)>,
    BTreeMap<String, (i64, i64, i64)>,
);

fn resources(s: &Snapshot) -> Resources {
    (s.users.clone(), s.products.clone())
}

/// Checks `raw` is exactly `{"error":{"code":<code>,"message":<non-empty>}}`
/// and, when given, that the message mentions `hint`. `Err` says what is
/// wrong, naming the case.
fn check_error_reply(case: &str, raw: &[u8], code: Code, hint: Option<&str>) -> Result<(), String> {
    let text = String::from_utf8_lossy(raw);
    let fail = |what: &str| Err(format!("{case}: {what}: {text}"));
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return fail("reply is not JSON");
    };
    let Some(top) = v.as_object() else {
        return fail("reply is not an object");
    };
    let Some(err) = top.get("error").and_then(|e| e.as_object()) else {
        return fail("not an error reply");
    };
    if top.len() != 1 || err.len() != 2 {
        return fail("an error reply has exactly error.code and error.message");
    }
    if err.get("code").and_then(|c| c.as_str()) != Some(code.as_str()) {
        return fail(&format!("expected code {code}"));
    }
    let Some(message) = err.get("message").and_then(|m| m.as_str()) else {
        return fail("message is not a string");
    };
    if message.trim().is_empty() {
        return fail("empty message");
    }
    if let Some(hint) = hint {
        if !message.contains(hint) {
            return fail(&format!("message should mention {hint:?}"));
        }
    }
    Ok(())
}

/// A bad public request: case name, subject, payload, expected code, and a
/// word the error message must contain.
type Case<'a> = (String, &'a str, Vec<u8>, Code, Option<&'a str>);

/// Sends every case and asserts each got its error reply; all failures are
/// reported together.
async fn assert_error_replies(sys: &System, cases: &[Case<'_>]) {
    let mut failures = vec![];
    for (case, subject, payload, code, hint) in cases {
        match sys.raw(subject, payload).await {
            Ok(raw) => {
                if let Err(e) = check_error_reply(case, &raw, *code, *hint) {
                    failures.push(e);
                }
            }
            Err(e) => failures.push(format!("{case}: no reply: {e:#}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad requests were not refused as expected:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// How many times `needle` occurs in a service's log.
fn log_count(sys: &mut System, kind: Kind, needle: &str) -> usize {
    sys.service(kind).proc.log().matches(needle).count()
}

/// Waits (bounded) until `needle` occurs `want` times in the service's log.
async fn wait_log_count(sys: &mut System, kind: Kind, needle: &str, want: usize, case: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = log_count(sys, kind, needle);
        if n == want {
            return;
        }
        if n > want || Instant::now() > deadline {
            panic!(
                "{case}: expected {want} log lines {needle:?} in {}, found {n}:\n{}",
                kind.name(),
                sys.service(kind).proc.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn send_decide(
    sys: &System,
    participant: impl AsRef<str>,
    tx: TxId,
    decision: Decision,
) -> DecideReply {
    let participant = ParticipantName::new(participant.as_ref()).unwrap();
    let raw = sys
        .raw(
            &subjects::decide(&participant),
            &protocol::encode(&Decide { tx, decision }),
        )
        .await
        .unwrap_or_else(|e| panic!("decide {decision:?} {tx} to {participant}: {e:#}"));
    protocol::decode(&raw)
        .unwrap_or_else(|e| panic!("decide reply from {participant} does not decode: {e}"))
}

async fn send_prepare(sys: &System, participant: impl AsRef<str>, tx: TxId, op: Vec<u8>) -> Vote {
    let participant = ParticipantName::new(participant.as_ref()).unwrap();
    let raw = sys
        .raw(
            &subjects::prepare(&participant),
            &protocol::encode(&Prepare {
                tx,
                client: ClientName::new("web").unwrap(),
                op,
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("prepare {tx} to {participant}: {e:#}"));
    protocol::decode(&raw)
        .unwrap_or_else(|e| panic!("vote from {participant} does not decode: {e}"))
}

/// A wallet op, as the coordinator sends it (canonical JSON).
fn debit(amount: u64) -> Vec<u8> {
    format!(r#"{{"amount":{amount},"user":"alice"}}"#).into_bytes()
}

/// An order op, as the coordinator sends it.
fn reserve(qty: u64, amount: u64) -> Vec<u8> {
    format!(r#"{{"amount":{amount},"qty":{qty},"sku":"book-1","user":"alice"}}"#).into_bytes()
}

fn purchase_json(user: &str, sku: &str, qty: u64, amount: u64) -> String {
    format!(r#"{{"user":"{user}","sku":"{sku}","qty":{qty},"amount":{amount}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_purchase_requests_get_error_replies_and_change_nothing() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let before = sys.snapshot();
    let mut told_all = vec![];

    let base = |field: &str| format!(r#"{{"user":"alice","sku":"book-1","qty":1,{field}}}"#);
    let valid = purchase_json("alice", "book-1", 1, 1_250);
    // A purchase that would commit if the size limit were not enforced.
    let padded_over = format!("{valid}{}", " ".repeat(5 * 1024 - valid.len()));

    // A few of each kind, end to end; every parsing case is a unit test
    // in `schemas/tests/bad_input.rs`.
    let malformed = Code::MalformedJson;
    let invalid = Code::InvalidRequest;
    let cases: Vec<(&str, Vec<u8>, Code, Option<&str>)> = vec![
        (
            "malformed JSON",
            br#"{"user":"alice","sku":"#.to_vec(),
            malformed,
            Some("JSON"),
        ),
        (
            "JSON array of the fields",
            br#"["alice","book-1",1,1250]"#.to_vec(),
            invalid,
            None,
        ),
        (
            // Ambiguous: committing either value would be wrong.
            "duplicate field, the last one a valid amount",
            base(r#""amount":1,"amount":1250"#).into_bytes(),
            invalid,
            Some("amount"),
        ),
        (
            "amount negative",
            base(r#""amount":-1250"#).into_bytes(),
            invalid,
            Some("-1250"),
        ),
        (
            "qty over 1_000_000",
            purchase_json("alice", "book-1", 1_000_001, 1_250).into_bytes(),
            invalid,
            Some("qty"),
        ),
        (
            "sku with a slash",
            purchase_json("alice", "book/1", 1, 1_250).into_bytes(),
            invalid,
            Some("sku"),
        ),
        (
            "valid purchase padded to 5 KiB",
            padded_over.into_bytes(),
            Code::PayloadTooLarge,
            Some("limit"),
        ),
    ];
    let cases: Vec<_> = cases
        .into_iter()
        .map(|(case, payload, code, hint)| {
            (
                format!("{} {case}", PURCHASE.as_str()),
                PURCHASE.as_str(),
                payload,
                code,
                hint,
            )
        })
        .collect();
    assert_error_replies(&sys, &cases).await;

    // Nothing changed anywhere: no balance, stock, hold, branch or decision.
    let after = sys.snapshot();
    assert_eq!(
        resources(&after),
        resources(&before),
        "bad purchases changed balances or stock"
    );
    assert!(
        after.decisions.is_empty(),
        "bad purchases reached the decision log: {:?}",
        after.decisions
    );
    assert!(
        after.wallet_branches.is_empty(),
        "a bad purchase reached the wallet: {:?}",
        after.wallet_branches
    );
    assert!(
        after.order_branches.is_empty(),
        "a bad purchase reached the order service: {:?}",
        after.order_branches
    );
    assert!(after.debits.is_empty() && after.orders.is_empty());

    // Well-formed purchases of unknown things are votes, not error replies.
    let unknown: [(&str, &str, &str, u64, &str, Code); 3] = [
        (
            "unknown user",
            "mallory",
            "book-1",
            1_250,
            "wallet",
            Code::UnknownUser,
        ),
        (
            "unknown sku",
            "alice",
            "sofa-9",
            100,
            "order",
            Code::UnknownSku,
        ),
        (
            "unknown 64-byte sku",
            "alice",
            &"k".repeat(64),
            100,
            "order",
            Code::UnknownSku,
        ),
    ];
    for (case, user, sku, amount, who, code) in unknown {
        let r = sys.purchase(user, sku, 1, amount).await;
        assert_eq!(r.outcome, Outcome::Aborted, "{case}: {r:?}");
        let reason = r
            .reason
            .clone()
            .unwrap_or_else(|| panic!("{case}: an abort says why: {r:?}"));
        assert_eq!(
            (reason.participant.as_str(), reason.code),
            (who, code),
            "{case}: {r:?}"
        );
        assert!(!reason.message.is_empty(), "{case}: {r:?}");
        told_all.push(Told::Aborted(tx_id(&r)));
    }
    let s = sys.wait_quiescent(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        resources(&s),
        resources(&before),
        "unknown user/sku changed something"
    );

    // The coordinator keeps serving: a valid purchase commits, and so does
    // one padded to exactly the size limit.
    let r = sys.purchase("alice", "book-1", 1, 1_250).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    told_all.push(Told::Committed(tx_id(&r)));
    let at_limit = format!("{valid}{}", " ".repeat(MAX_REQUEST_BYTES - valid.len()));
    assert_eq!(at_limit.len(), MAX_REQUEST_BYTES);
    let raw = sys
        .raw(PURCHASE.as_str(), at_limit.as_bytes())
        .await
        .unwrap();
    let r: twopc_schemas::api::PurchaseReply = serde_json::from_slice(&raw).unwrap_or_else(|e| {
        panic!(
            "a request of exactly {MAX_REQUEST_BYTES} bytes is accepted ({e}): {}",
            String::from_utf8_lossy(&raw)
        )
    });
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    told_all.push(Told::Committed(tx_id(&r)));
    assert_eq!(sys.balance("alice").await.balance, 10_000 - 2 * 1_250);
    assert_eq!(sys.stock("book-1").await.stock, 10 - 2);

    let s = sys.assert_consistent(&told_all).await;
    assert_eq!(
        s.debits.len(),
        2,
        "only the two valid purchases were charged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_on_read_and_admin_subjects_get_error_replies_and_change_nothing() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let before = sys.snapshot();

    let big = format!(r#"{{"user":"alice"}}{}"#, " ".repeat(MAX_REQUEST_BYTES));
    let big_sku = format!(r#"{{"sku":"book-1"}}{}"#, " ".repeat(MAX_REQUEST_BYTES));
    let wallet_tx = subjects::participant_tx(&participant::WALLET);
    let order_tx = subjects::participant_tx(&participant::ORDER);
    let fresh = TxId::now_v7().to_string();
    let tx_ok = format!(r#"{{"tx":"{fresh}"}}"#);

    use Code::{
        AlreadyExists, InvalidRequest as Invalid, MalformedJson as Malformed,
        PayloadTooLarge as TooLarge,
    };
    // A few per subject, end to end, and every refusal that needs the
    // database (unknown user or sku, already exists); every parsing case is
    // a unit test in `schemas/tests/bad_input.rs`.
    let cases: Vec<(&str, String, Code, Option<&str>)> = vec![
        // wallet.balance
        (
            subjects::WALLET_BALANCE,
            "{\"user\":".into(),
            Malformed,
            None,
        ),
        (
            subjects::WALLET_BALANCE,
            r#"{"user":"alice","all":true}"#.into(),
            Invalid,
            Some("all"),
        ),
        (
            subjects::WALLET_BALANCE,
            r#"{"user":"mallory"}"#.into(),
            Code::UnknownUser,
            Some("mallory"),
        ),
        (subjects::WALLET_BALANCE, big, TooLarge, None),
        // order.stock
        (subjects::ORDER_STOCK, "[".into(), Malformed, None),
        (
            subjects::ORDER_STOCK,
            r#"{"sku":"book-1","price":1}"#.into(),
            Invalid,
            Some("price"),
        ),
        (
            subjects::ORDER_STOCK,
            r#"{"sku":"sofa-9"}"#.into(),
            Code::UnknownSku,
            Some("sofa-9"),
        ),
        (subjects::ORDER_STOCK, big_sku, TooLarge, None),
        // wallet.users.create: every refused creation names a new user, so a
        // validation gap would show up as an extra row.
        (
            subjects::WALLET_CREATE_USER,
            r#"{"user":"eve","balance":}"#.into(),
            Malformed,
            None,
        ),
        (
            subjects::WALLET_CREATE_USER,
            r#"{"user":"eve","balance":-100}"#.into(),
            Invalid,
            Some("-100"),
        ),
        (
            subjects::WALLET_CREATE_USER,
            r#"{"user":"eve","balance":0,"balance":1000}"#.into(),
            Invalid,
            Some("balance"),
        ),
        (
            subjects::WALLET_CREATE_USER,
            r#"{"user":"alice","balance":1}"#.into(),
            AlreadyExists,
            Some("alice"),
        ),
        (
            subjects::WALLET_CREATE_USER,
            r#"{"user":"alice","balance":10000}"#.into(),
            AlreadyExists,
            Some("alice"),
        ),
        // order.products.create
        (
            subjects::ORDER_CREATE_PRODUCT,
            r#"{"sku":"mug-1","price":100,"stock":5"#.into(),
            Malformed,
            None,
        ),
        (
            subjects::ORDER_CREATE_PRODUCT,
            r#"{"sku":"mug-1","price":0,"stock":5}"#.into(),
            Invalid,
            Some("price"),
        ),
        (
            subjects::ORDER_CREATE_PRODUCT,
            r#"{"sku":"mug-1","price":100,"stock":5,"tax":0}"#.into(),
            Invalid,
            Some("tax"),
        ),
        (
            subjects::ORDER_CREATE_PRODUCT,
            r#"{"sku":"book-1","price":1,"stock":1000}"#.into(),
            AlreadyExists,
            Some("book-1"),
        ),
        // shop.tx, wallet.tx, order.tx
        (subjects::TX_STATUS, "{\"tx\"".into(), Malformed, None),
        (
            subjects::TX_STATUS,
            r#"{"tx":"not-a-uuid"}"#.into(),
            Invalid,
            Some("tx"),
        ),
        (wallet_tx.as_str(), "tx".into(), Malformed, None),
        (
            wallet_tx.as_str(),
            r#"{"tx":"0193-nope"}"#.into(),
            Invalid,
            Some("tx"),
        ),
        (
            order_tx.as_str(),
            r#"{"tx":"zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"}"#.into(),
            Invalid,
            Some("tx"),
        ),
        (
            order_tx.as_str(),
            format!(r#"{{"tx":"{fresh}"}}{}"#, " ".repeat(MAX_REQUEST_BYTES)),
            TooLarge,
            None,
        ),
    ];
    let cases: Vec<_> = cases
        .into_iter()
        .map(|(subject, payload, code, hint)| {
            (
                format!("{subject} {:?}", truncate(&payload)),
                subject,
                payload.into_bytes(),
                code,
                hint,
            )
        })
        .collect();
    assert_error_replies(&sys, &cases).await;

    let after = sys.snapshot();
    assert_eq!(
        resources(&after),
        resources(&before),
        "bad requests changed users or products"
    );
    assert!(after.decisions.is_empty(), "{:?}", after.decisions);
    assert!(after.wallet_branches.is_empty() && after.order_branches.is_empty());

    // Every service keeps serving, valid requests of each kind included.
    assert_eq!(sys.balance("alice").await.balance, 10_000);
    let book = sys.stock("book-1").await;
    assert_eq!((book.price, book.stock), (1_250, 10));
    for subject in [subjects::TX_STATUS, wallet_tx.as_str(), order_tx.as_str()] {
        let raw = sys.raw(subject, tx_ok.as_bytes()).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(v["state"], "unknown", "{subject}: {v}");
    }
    sys.seed(&[("eve", 300)], &[("mug-1", 100, 5)])
        .await
        .unwrap();
    let r = sys.purchase("eve", "mug-1", 3, 300).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    sys.assert_consistent(&[Told::Committed(tx_id(&r))]).await;
}

fn truncate(s: &str) -> String {
    if s.len() > 80 {
        format!("{}... ({} bytes)", &s[..80], s.len())
    } else {
        s.to_owned()
    }
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
/// another kind, size.
fn garbage_for<M: Message + std::fmt::Debug>(
    valid: &M,
    other_kind: Vec<u8>,
) -> Vec<(String, Vec<u8>, bool)> {
    let good = protocol::encode(valid);
    let mut oversized = good.clone();
    oversized.resize(MAX_MESSAGE_BYTES + 1, 0);
    // Four per subject, end to end: garbage, a valid envelope of the wrong
    // kind, garbage in this kind's envelope, and one past the size limit. Every garbled variant is a unit
    // test in `schemas/tests/bad_input.rs`.
    let cases = vec![
        ("random bytes".to_string(), noise(0x5eed_0001, 48)),
        ("envelope of another kind".into(), other_kind),
        ("its own envelope around garbage".into(), {
            let mut v = good[..2].to_vec();
            v.extend(noise(0x5eed_0002, 40));
            v
        }),
        (
            format!("valid message padded past {MAX_MESSAGE_BYTES} bytes"),
            oversized,
        ),
    ];
    // Whether the receiver answers `Unsupported` (an envelope of another
    // kind or version, garbage included when its first bytes read so) or a
    // no vote / rejection `bad_message`.
    let cases: Vec<(String, Vec<u8>, bool)> = cases
        .into_iter()
        .map(|(case, bytes)| {
            let unsupported = protocol::decode::<M>(&bytes).is_err_and(|e| e.is_unsupported());
            (case, bytes, unsupported)
        })
        .collect();
    for (case, bytes, unsupported) in &cases {
        assert_eq!(
            *unsupported,
            case.contains("another kind") || (case.contains("random") && *unsupported),
            "test bug: {case}"
        );
        // Keep the table honest: none of these may be a valid `M`.
        assert!(
            protocol::decode::<M>(bytes).is_err(),
            "test bug: {case} decodes as {}",
            M::NAME
        );
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_protocol_messages_are_rejected_logged_and_change_nothing() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let before = sys.snapshot();
    let tx = TxId::now_v7();

    // Each valid message below would hold, reserve or tombstone something,
    // so if a garbled variant were accepted the snapshot would show it.
    let web = ClientName::new("web").unwrap();
    let prepare_wallet = Prepare {
        tx,
        client: web.clone(),
        op: debit(1_250),
    };
    let prepare_order = Prepare {
        tx,
        client: web,
        op: reserve(1, 1_250),
    };
    let decide = Decide {
        tx,
        decision: Decision::Abort,
    };
    let query = DecisionQuery {
        tx,
        participant: participant::WALLET,
    };

    enum Reply {
        Vote,
        Decide,
        Decision,
    }
    let targets = [
        (
            subjects::prepare(&participant::WALLET),
            Kind::Wallet,
            "rejected prepare that does not decode",
            Reply::Vote,
            garbage_for(&prepare_wallet, protocol::encode(&Vote::Yes)),
        ),
        (
            subjects::prepare(&participant::ORDER),
            Kind::Order,
            "rejected prepare that does not decode",
            Reply::Vote,
            garbage_for(&prepare_order, protocol::encode(&decide)),
        ),
        (
            subjects::decide(&participant::WALLET),
            Kind::Wallet,
            "rejected decision that does not decode",
            Reply::Decide,
            garbage_for(&decide, protocol::encode(&prepare_wallet)),
        ),
        (
            subjects::decide(&participant::ORDER),
            Kind::Order,
            "rejected decision that does not decode",
            Reply::Decide,
            garbage_for(&decide, protocol::encode(&DecideReply::Ack)),
        ),
        (
            subjects::decision_query(&participant::WALLET),
            Kind::Coordinator,
            "rejected decision query that does not decode",
            Reply::Decision,
            garbage_for(&query, protocol::encode(&decide)),
        ),
    ];

    for (subject, kind, needle, reply, cases) in &targets {
        for (case, payload, unsupported) in cases {
            // Another kind is a message this build does not speak: the
            // answer is `Unsupported`, listing what it speaks.
            let unsupported = *unsupported;
            let needle = if unsupported {
                "does not speak"
            } else {
                needle
            };
            let case = format!("{subject}: {case}");
            let logged = log_count(&mut sys, *kind, needle);
            let raw = sys
                .raw(subject, payload)
                .await
                .unwrap_or_else(|e| panic!("{case}: no reply: {e:#}\n{}", sys.logs()));
            if unsupported {
                let u = protocol::decode::<Unsupported>(&raw)
                    .unwrap_or_else(|e| panic!("{case}: expected Unsupported: {e}"));
                assert!(!u.message.is_empty(), "{case}: it says why");
                assert_eq!(
                    u.speaks,
                    protocol::speaks(),
                    "{case}: it says what it speaks"
                );
                wait_log_count(&mut sys, *kind, needle, logged + 1, &case).await;
                continue;
            }
            let (code, message) = match reply {
                Reply::Vote => match protocol::decode::<Vote>(&raw) {
                    Ok(Vote::No { code, message }) => (code, message),
                    other => panic!("{case}: expected a no vote, got {other:?}"),
                },
                Reply::Decide => match protocol::decode::<DecideReply>(&raw) {
                    Ok(DecideReply::Rejected { code, message }) => (code, message),
                    other => panic!("{case}: expected a rejection, got {other:?}"),
                },
                Reply::Decision => match protocol::decode::<DecisionReply>(&raw) {
                    Ok(DecisionReply::Rejected { code, message }) => (code, message),
                    other => panic!("{case}: expected a rejection, got {other:?}"),
                },
            };
            assert_eq!(code, Code::BadMessage, "{case}: {message}");
            assert!(!message.is_empty(), "{case}: the rejection says why");
            wait_log_count(&mut sys, *kind, needle, logged + 1, &case).await;
        }
    }

    // Nothing was held, reserved, tombstoned or decided.
    let after = sys.snapshot();
    assert_eq!(
        resources(&after),
        resources(&before),
        "garbled messages changed balances or stock"
    );
    assert!(after.holds.is_empty() && after.reservations.is_empty());
    assert!(
        after.wallet_branches.is_empty(),
        "wallet recorded a branch: {:?}",
        after.wallet_branches
    );
    assert!(
        after.order_branches.is_empty(),
        "order recorded a branch: {:?}",
        after.order_branches
    );
    assert!(
        after.decisions.is_empty(),
        "coordinator recorded a decision: {:?}",
        after.decisions
    );

    // All three services keep serving the protocol: a purchase commits, and
    // a valid decision query about it is answered.
    let r = sys.purchase("alice", "book-1", 2, 2_500).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    let committed = tx_id(&r);
    let raw = sys
        .raw(
            &subjects::decision_query(&participant::WALLET),
            &protocol::encode(&DecisionQuery {
                tx: committed,
                participant: participant::WALLET,
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        protocol::decode::<DecisionReply>(&raw),
        Ok(DecisionReply::Decided {
            tx: committed,
            decision: Decision::Commit
        })
    );
    assert_eq!(sys.balance("alice").await.balance, 10_000 - 2_500);
    sys.assert_consistent(&[Told::Committed(committed)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_protocol_messages_are_refused_and_change_nothing() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let mut told_all = vec![];

    // (a) A forged commit for a transaction never prepared anywhere.
    let start = sys.snapshot();
    let forged = TxId::now_v7();
    for p in &participant::PURCHASE_PARTICIPANTS {
        match send_decide(&sys, p, forged, Decision::Commit).await {
            DecideReply::Rejected {
                code: Code::UnknownTx,
                message,
            } => assert!(!message.is_empty()),
            other => panic!("(a) forged commit of an unknown tx at {p}: {other:?}"),
        }
    }
    let s = sys.snapshot();
    assert_eq!(
        resources(&s),
        resources(&start),
        "(a) a forged commit changed something"
    );
    assert!(
        s.wallet_branches.is_empty() && s.order_branches.is_empty(),
        "(a) a forged commit left a branch"
    );
    assert!(s.debits.is_empty() && s.orders.is_empty());

    // A real purchase commits.
    let r = sys.purchase("alice", "book-1", 2, 2_500).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    let tx = tx_id(&r);
    told_all.push(Told::Committed(tx));
    let committed = sys.wait_quiescent(Duration::from_secs(10)).await.unwrap();
    assert_eq!(committed.users["alice"], (7_500, 0));
    assert_eq!(committed.products["book-1"], (1_250, 8, 0));
    let unchanged = |s: &Snapshot, case: &str| {
        assert_eq!(
            resources(s),
            resources(&committed),
            "{case}: balances or stock changed"
        );
        assert_eq!(s.debits, committed.debits, "{case}: debits changed");
        assert_eq!(s.orders, committed.orders, "{case}: orders changed");
        assert!(
            s.holds.is_empty() && s.reservations.is_empty(),
            "{case}: something is held"
        );
        assert_eq!(
            s.wallet_branches.get(&tx).copied(),
            Some(BranchState::Committed),
            "{case}"
        );
        assert_eq!(
            s.order_branches.get(&tx).copied(),
            Some(BranchState::Committed),
            "{case}"
        );
    };

    // (b) Replayed commit: acknowledged again, applied once.
    for round in 0..2 {
        for p in &participant::PURCHASE_PARTICIPANTS {
            let reply = send_decide(&sys, p, tx, Decision::Commit).await;
            assert_eq!(
                reply,
                DecideReply::Ack,
                "(b) replayed commit #{round} at {p}"
            );
        }
    }
    unchanged(&sys.snapshot(), "(b) replayed commit");
    assert_eq!(
        sys.balance("alice").await.balance,
        7_500,
        "(b) charged once"
    );
    assert_eq!(sys.stock("book-1").await.stock, 8, "(b) stock taken once");

    // (b') Replayed identical prepares repeat the vote and hold nothing new.
    assert_eq!(
        send_prepare(&sys, &participant::WALLET, tx, debit(2_500)).await,
        Vote::Yes,
        "(b') replayed wallet prepare"
    );
    assert_eq!(
        send_prepare(&sys, &participant::ORDER, tx, reserve(2, 2_500)).await,
        Vote::Yes,
        "(b') replayed order prepare"
    );
    unchanged(&sys.snapshot(), "(b') replayed prepare");

    // (c) A forged abort of the committed transaction.
    for p in &participant::PURCHASE_PARTICIPANTS {
        match send_decide(&sys, p, tx, Decision::Abort).await {
            DecideReply::Rejected {
                code: Code::Conflict,
                message,
            } => assert!(!message.is_empty()),
            other => panic!("(c) forged abort of a committed tx at {p}: {other:?}"),
        }
    }
    unchanged(&sys.snapshot(), "(c) forged abort");

    // (d) A forged prepare reusing the committed id with other content.
    let forged_prepares = [
        ("wallet", debit(1)),
        ("wallet", debit(5_000)),
        ("wallet", br#"{"amount":2500,"user":"bob"}"#.to_vec()),
        ("order", reserve(1, 1_250)),
        ("order", reserve(8, 10_000)),
        // The wrong kind of operation for the participant.
        ("wallet", reserve(2, 2_500)),
        ("order", debit(2_500)),
    ];
    for (p, op) in forged_prepares {
        let case = format!(
            "(d) forged prepare {} to {p} for the committed tx",
            String::from_utf8_lossy(&op)
        );
        match send_prepare(&sys, p, tx, op).await {
            Vote::No {
                code: Code::Conflict,
                message,
            } => assert!(!message.is_empty(), "{case}"),
            other => panic!("{case}: {other:?}"),
        }
        unchanged(&sys.snapshot(), &case);
    }
    assert_eq!(sys.balance("alice").await.held, 0, "(d) nothing held");
    assert_eq!(sys.balance("bob").await.held, 0, "(d) nothing held");
    assert_eq!(
        sys.stock("book-1").await.reserved,
        0,
        "(d) nothing reserved"
    );

    // (e) A forged abort of an unknown transaction leaves a tombstone, and a
    // prepare for that id afterwards votes no and holds nothing.
    let ghost = TxId::now_v7();
    for p in &participant::PURCHASE_PARTICIPANTS {
        assert_eq!(
            send_decide(&sys, p, ghost, Decision::Abort).await,
            DecideReply::Ack,
            "(e) forged abort at {p}"
        );
    }
    let s = sys.snapshot();
    assert_eq!(
        s.wallet_branches.get(&ghost).copied(),
        Some(BranchState::Aborted),
        "(e) wallet tombstone"
    );
    assert_eq!(
        s.order_branches.get(&ghost).copied(),
        Some(BranchState::Aborted),
        "(e) order tombstone"
    );
    for (p, op) in [("wallet", debit(1_250)), ("order", reserve(1, 1_250))] {
        match send_prepare(&sys, p, ghost, op).await {
            Vote::No {
                code: Code::AlreadyAborted,
                message,
            } => assert!(!message.is_empty()),
            other => panic!("(e) prepare after the tombstone at {p}: {other:?}"),
        }
        // A forged commit cannot revive it either.
        match send_decide(&sys, p, ghost, Decision::Commit).await {
            DecideReply::Rejected {
                code: Code::Conflict,
                ..
            } => {}
            other => panic!("(e) forged commit of the tombstoned tx at {p}: {other:?}"),
        }
    }
    let s = sys.snapshot();
    assert_eq!(s.users["alice"], (7_500, 0), "(e) nothing held");
    assert_eq!(s.products["book-1"], (1_250, 8, 0), "(e) nothing reserved");
    assert_eq!(sys.balance("alice").await.held, 0);
    assert!(s.holds.is_empty() && s.reservations.is_empty());
    assert_eq!(
        s.wallet_branches.get(&ghost).copied(),
        Some(BranchState::Aborted)
    );

    // (f) A forged commit of a transaction the coordinator aborted: carol
    // cannot pay, so the wallet voted no while the order service prepared
    // and then released.
    let r = sys.purchase("carol", "book-1", 1, 1_250).await;
    assert_eq!(r.outcome, Outcome::Aborted, "{r:?}");
    let aborted = tx_id(&r);
    told_all.push(Told::Aborted(aborted));
    let s_aborted = sys.wait_quiescent(Duration::from_secs(10)).await.unwrap();
    for p in &participant::PURCHASE_PARTICIPANTS {
        match send_decide(&sys, p, aborted, Decision::Commit).await {
            DecideReply::Rejected {
                code: Code::Conflict,
                ..
            } => {}
            other => panic!("(f) forged commit of an aborted tx at {p}: {other:?}"),
        }
    }
    let s = sys.snapshot();
    assert_eq!(
        resources(&s),
        resources(&s_aborted),
        "(f) a forged commit changed something"
    );
    assert_eq!(s.debits, committed.debits);
    assert_eq!(s.orders, committed.orders);
    assert_eq!(sys.balance("carol").await.balance, 500);

    // The coordinator's record is untouched and the system still works.
    let raw = sys.tx_status(subjects::TX_STATUS, &tx.to_string()).await;
    assert_eq!(raw["state"], "committed");
    let r = sys.purchase("bob", "pen-1", 1, 199).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    told_all.push(Told::Committed(tx_id(&r)));
    let s = sys.assert_consistent(&told_all).await;
    assert_eq!(s.debits.len(), 2, "two purchases charged, each once");
}

/// Protocol messages get the public API's limits. A forged or buggy
/// `Prepare` outside them — an amount above `i64::MAX` that price × qty
/// nevertheless matches, a quantity beyond the cap, malformed identifiers —
/// is refused with a no vote (`bad_message`) before anything is written.
/// Before this was checked the order service voted yes to an amount it
/// could never store, so the commit failed forever after the wallet had
/// committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepares_outside_the_public_limits_vote_no_and_change_nothing() {
    use twopc_schemas::api::{MAX_AMOUNT, MAX_ID_BYTES, MAX_QTY, MAX_STOCK};
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    // Products whose price × qty can reach past i64::MAX, and one with
    // stock enough for a quantity beyond the cap: every other check passes.
    let price_2_49 = 1u64 << 49;
    sys.seed(
        &[],
        &[
            ("gold-1", MAX_AMOUNT, 100_000),
            ("gold-2", price_2_49, 100_000),
            ("grain-1", 1, MAX_STOCK),
        ],
    )
    .await
    .unwrap();
    let before = sys.snapshot();
    let long_id = "a".repeat(MAX_ID_BYTES + 1);
    // As the coordinator would send them: canonical JSON.
    let reserve_of = |user: &str, sku: &str, qty: u64, amount: u64| {
        serde_json::to_vec(
            &serde_json::json!({"user": user, "sku": sku, "qty": qty, "amount": amount}),
        )
        .unwrap()
    };
    let debit_of = |user: &str, amount: u64| {
        serde_json::to_vec(&serde_json::json!({"user": user, "amount": amount})).unwrap()
    };
    let over_cap = MAX_QTY + 1;
    let cases = [
        // 10^4 × 10^15 = 10^19 > i64::MAX: the price matches.
        (
            "order",
            reserve_of("alice", "gold-1", 10_000, 10_000 * MAX_AMOUNT),
        ),
        // 2^14 × 2^49 = 2^63 = i64::MAX + 1: the price matches.
        (
            "order",
            reserve_of("alice", "gold-2", 1 << 14, i64::MAX as u64 + 1),
        ),
        ("order", reserve_of("alice", "book-1", 1, u64::MAX)),
        // Beyond the quantity cap, though in stock and priced right.
        ("order", reserve_of("alice", "grain-1", over_cap, over_cap)),
        (
            "order",
            reserve_of("alice", "grain-1", u64::from(u32::MAX), u64::from(u32::MAX)),
        ),
        ("order", reserve_of("alice", "book-1", 0, 0)),
        ("order", reserve_of("al ice", "book-1", 1, 1_250)),
        ("order", reserve_of("", "book-1", 1, 1_250)),
        ("order", reserve_of("alice", "book 1", 1, 1_250)),
        ("order", reserve_of("alice", &long_id, 1, 1_250)),
        ("order", reserve_of(&long_id, "book-1", 1, 1_250)),
        ("wallet", debit_of("alice", u64::MAX)),
        ("wallet", debit_of("alice", i64::MAX as u64 + 1)),
        ("wallet", debit_of("alice", MAX_AMOUNT + 1)),
        ("wallet", debit_of("alice", 0)),
        ("wallet", debit_of("", 1)),
        ("wallet", debit_of("al ice", 1)),
        ("wallet", debit_of("alice\n", 1)),
        ("wallet", debit_of(&long_id, 1)),
    ];
    let mut failures = vec![];
    for (p, op) in cases {
        let tx = TxId::now_v7();
        let case = format!("prepare {} at {p}", String::from_utf8_lossy(&op));
        match send_prepare(&sys, p, tx, op).await {
            Vote::No {
                code: Code::BadMessage,
                message,
            } if !message.is_empty() => {}
            other => failures.push(format!(
                "{case}: expected a bad_message no vote, got {other:?}"
            )),
        }
        let s = sys.snapshot();
        if resources(&s) != resources(&before) {
            failures.push(format!("{case}: balances or stock changed"));
        }
        if s.wallet_branches.contains_key(&tx) || s.order_branches.contains_key(&tx) {
            failures.push(format!("{case}: a branch row was written"));
        }
        if !(s.holds.is_empty() && s.reservations.is_empty()) {
            failures.push(format!("{case}: something is held"));
        }
    }
    assert!(
        failures.is_empty(),
        "prepares outside the limits were not refused:\n{}",
        failures.join("\n")
    );

    // The edges of the limits are inside them: the order service reserves
    // the largest quantity, and the wallet judges the largest amount on its
    // merits (alice cannot pay it) rather than as a bad message.
    let edge = TxId::now_v7();
    let max_qty = MAX_QTY;
    assert_eq!(
        send_prepare(
            &sys,
            "order",
            edge,
            reserve_of("alice", "grain-1", max_qty, MAX_QTY)
        )
        .await,
        Vote::Yes,
        "the largest quantity is allowed"
    );
    assert_eq!(
        send_decide(&sys, &participant::ORDER, edge, Decision::Abort).await,
        DecideReply::Ack
    );
    match send_prepare(
        &sys,
        "wallet",
        TxId::now_v7(),
        debit_of("alice", MAX_AMOUNT),
    )
    .await
    {
        Vote::No {
            code: Code::InsufficientFunds,
            ..
        } => {}
        other => panic!("the largest amount is judged on its merits: {other:?}"),
    }

    // The services still serve.
    let r = sys.purchase("alice", "book-1", 2, 2_500).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    sys.assert_consistent(&[Told::Committed(tx_id(&r))]).await;
}

/// A UUIDv7 that starts `ms_from_now` after now (negative: before).
fn tx_from_now(ms_from_now: i64) -> TxId {
    let now = twopc_common::now_ms();
    uuid::Builder::from_unix_timestamp_millis((now + ms_from_now) as u64, &[9; 10]).into_uuid()
}

/// Issue 11: protocol ids are checked like the public API's, at every
/// receiver. A prepare, a decision (commit, or abort: it would write a
/// tombstone) and a decision query whose transaction id is nil, a UUIDv4,
/// or a UUIDv7 an hour in the future are refused with a code saying so,
/// and nothing is written anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_messages_with_impossible_tx_ids_are_refused_and_change_nothing() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let before = sys.snapshot();
    let v4 = TxId::from_u128(0x0193_0000_0000_4000_8000_0000_0000_002a);
    let cases = [
        ("nil", TxId::nil(), Code::BadTxId),
        ("UUIDv4", v4, Code::BadTxId),
        ("an hour ahead", tx_from_now(3_600_000), Code::TxInFuture),
    ];
    let mut failures = vec![];
    for (what, tx, code) in cases {
        for (p, op) in [("wallet", debit(1_250)), ("order", reserve(1, 1_250))] {
            match send_prepare(&sys, p, tx, op).await {
                Vote::No { code: c, message } if c == code && !message.is_empty() => {}
                other => failures.push(format!("prepare ({what}) at {p}: {other:?}")),
            }
            for decision in [Decision::Abort, Decision::Commit] {
                match send_decide(&sys, p, tx, decision).await {
                    DecideReply::Rejected { code: c, message }
                        if c == code && !message.is_empty() => {}
                    other => failures.push(format!("{decision:?} ({what}) at {p}: {other:?}")),
                }
            }
        }
        let raw = sys
            .raw(
                &subjects::decision_query(&participant::WALLET),
                &protocol::encode(&DecisionQuery {
                    tx,
                    participant: participant::WALLET,
                }),
            )
            .await
            .unwrap();
        match protocol::decode::<DecisionReply>(&raw) {
            Ok(DecisionReply::Rejected { code: c, message })
                if c == code && !message.is_empty() => {}
            other => failures.push(format!("decision query ({what}): {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "not refused as expected:\n{}",
        failures.join("\n")
    );
    let after = sys.snapshot();
    assert_eq!(resources(&after), resources(&before));
    assert!(
        after.wallet_branches.is_empty() && after.order_branches.is_empty(),
        "a branch or tombstone was written: {:?} {:?}",
        after.wallet_branches,
        after.order_branches
    );
    assert!(
        after.decisions.is_empty(),
        "a decision was recorded: {:?}",
        after.decisions
    );

    // The services still serve, and ids within the skew are fine.
    let r = sys.purchase("alice", "book-1", 1, 1_250).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    sys.assert_consistent(&[Told::Committed(tx_id(&r))]).await;
}

/// Issue 11: a decision query names its sender. The subject
/// `twopc.decision.<participant>` is the sender (the server lets each
/// participant publish only its own); a query whose body names another
/// participant is refused (`wrong_sender`) and records nothing, and a
/// participant that is not a branch of a decided transaction learns
/// nothing (`not_a_branch`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_queries_from_the_wrong_sender_or_a_stranger_are_refused() {
    // `ledger`: a participant identity the server knows, in no purchase.
    let mut sys = System::start(Options {
        more_participants: vec!["ledger"],
        ..Options::default()
    })
    .await
    .unwrap();
    sys.seed_standard().await.unwrap();
    let query = |subject_of: ParticipantName, names: ParticipantName, tx: TxId| {
        let subject = subjects::decision_query(&subject_of);
        let payload = protocol::encode(&DecisionQuery {
            tx,
            participant: names,
        });
        let sys = &sys;
        async move {
            let raw = sys.raw(&subject, &payload).await.unwrap();
            protocol::decode::<DecisionReply>(&raw).unwrap()
        }
    };

    // A fresh id: the wallet's subject, the order service in the body.
    let fresh = TxId::now_v7();
    match query(participant::WALLET, participant::ORDER, fresh).await {
        DecisionReply::Rejected {
            code: Code::WrongSender,
            message,
        } => assert!(
            message.contains("order") && message.contains("wallet"),
            "{message}"
        ),
        other => panic!("a query naming another participant: {other:?}"),
    }
    assert!(
        sys.snapshot().decisions.is_empty(),
        "the refused query recorded a presumed abort"
    );

    // A committed purchase: a participant that is not one of its branches
    // is refused; its branches hear the decision.
    let r = sys.purchase("alice", "book-1", 1, 1_250).await;
    assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
    let tx = tx_id(&r);
    let ledger = ParticipantName::new("ledger").unwrap();
    match query(ledger.clone(), ledger.clone(), tx).await {
        DecisionReply::Rejected {
            code: Code::NotABranch,
            ..
        } => {}
        other => panic!("a stranger asking about {tx}: {other:?}"),
    }
    for p in participant::PURCHASE_PARTICIPANTS {
        assert_eq!(
            query(p.clone(), p.clone(), tx).await,
            DecisionReply::Decided {
                tx,
                decision: Decision::Commit
            },
            "{p}"
        );
    }
    let s = sys.assert_consistent(&[Told::Committed(tx)]).await;
    assert_eq!(s.decisions.len(), 1, "only the purchase's decision");
}
