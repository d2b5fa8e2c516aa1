//! One live owner per participant name (ARCHITECTURE.md, "One owner per
//! participant"): a second instance never serves beside the owner, a
//! paused owner that wakes after a successor took over writes nothing, and
//! a rolling restart under load loses and splits nothing. Real processes,
//! real signals, the real lease in the server's JetStream KV.

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{poll_until, told, tx_id, Options, System};
use twopc_launcher::client::Reply;
use twopc_launcher::{Kind, Proc};
use twopc_schemas::api::{Outcome, PurchaseRequest};
use twopc_schemas::Code;
use twopc_verify::check::{KeyReply, Told};

/// Waits until `p`'s log, from byte `from` on, contains `needle`.
async fn wait_log(p: &Proc, from: usize, needle: &str, timeout: Duration) -> String {
    poll_until(&format!("{} to log {needle:?}", p.name), timeout, || {
        let log = p.log();
        let new = log.get(from..).unwrap_or_default().to_owned();
        async move {
            if new.contains(needle) {
                Ok(new)
            } else {
                Err(new.lines().rev().take(5).collect::<Vec<_>>().join(" | "))
            }
        }
    })
    .await
}

/// Waits until `p` exits by itself; its exit status.
async fn exit_of(p: &mut Proc, timeout: Duration) -> String {
    p.wait_exit(timeout)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", p.log()))
}

/// Prepared, committed or aborted branches in a participant database.
fn branches_in(db: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT count(*) FROM branches", [], |r| r.get(0))
        .unwrap()
}

fn request(user: &str, request_id: String) -> PurchaseRequest {
    PurchaseRequest {
        user: user.into(),
        sku: "pen-1".into(),
        qty: 1,
        amount: 199,
        request_id: Some(request_id),
    }
}

/// Two more wallets, each with its own (empty) data folder, started at the
/// same moment against a running system while alice buys: neither ever
/// serves, both exit non-zero naming the live owner, and every purchase
/// commits at the one wallet that has her.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_instances_with_their_own_data_never_serve() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let owner_pid = sys.service(Kind::Wallet).proc.pid().unwrap();
    let mut dups: Vec<Proc> = (2..=3)
        .map(|i| {
            let dir = sys.data_dir(&format!("wallet-{i}"));
            sys.duplicate(Kind::Wallet, &format!("wallet-{i}"), &dir)
        })
        .collect();
    for d in &mut dups {
        d.start().unwrap();
    }
    // Purchases while the two start, look and give up.
    let mut told_all = vec![];
    for i in 0..10 {
        let r = sys
            .purchase_with(
                &request("alice", format!("dup-{i}")),
                Duration::from_secs(15),
            )
            .await;
        match &r {
            Ok(Reply::Ok(p)) => assert_eq!(p.outcome, Outcome::Committed, "{p:?}"),
            other => panic!("purchase {i}: {other:?}"),
        }
        told_all.push(told(&r));
    }
    for d in &mut dups {
        let status = exit_of(d, Duration::from_secs(30)).await;
        assert!(
            !status.contains("exit status: 0"),
            "{} exited {status}",
            d.name
        );
        let log = d.log();
        assert!(
            log.contains("not serving: the name belongs to store")
                && log.contains("its live owner is instance")
                && log.contains(&format!("pid {owner_pid} ")),
            "{} must name the live owner:\n{log}",
            d.name
        );
        assert!(!log.contains("OWNER:"), "{} served:\n{log}", d.name);
        let db = sys.data_dir(&d.name).join("wallet.db");
        assert_eq!(branches_in(&db), 0, "{} wrote a branch", d.name);
    }
    assert!(sys.service(Kind::Wallet).proc.is_running());
    sys.assert_consistent(&told_all).await;
    // And the owner still serves.
    let r = sys.purchase("alice", "pen-1", 1, 199).await;
    assert_eq!(r.outcome, Outcome::Committed);
}

/// The check above can fail: a second wallet that skips owning its name
/// (`TWOPC_BREAK=no_owner`, as every instance did before) joins the queue
/// group and takes some of alice's purchases, which it cannot know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_owning_a_second_wallet_splits_the_purchases() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let dir = sys.data_dir("wallet-2");
    let mut dup = sys.duplicate(Kind::Wallet, "wallet-2", &dir);
    dup.set_env("TWOPC_BREAK", Some("no_owner"));
    dup.start().unwrap();
    wait_log(&dup, 0, "participant serving", Duration::from_secs(20)).await;
    // "participant serving" is logged as the subscriptions are being made,
    // not after: buy until the unowned wallet has taken one (at least 20
    // purchases, at most 200), waiting on that state rather than a guess.
    let mut unknown_user = 0;
    let mut sent = 0;
    while sent < 200 && (sent < 20 || unknown_user == 0) {
        let r = sys
            .purchase_with(
                &request("alice", format!("split-{sent}")),
                Duration::from_secs(15),
            )
            .await;
        sent += 1;
        if let Ok(Reply::Ok(p)) = &r {
            if p.reason
                .as_ref()
                .is_some_and(|w| w.code == Code::UnknownUser)
            {
                unknown_user += 1;
            }
        }
    }
    assert!(
        unknown_user > 0,
        "the unowned second wallet took none of {sent} purchases:\n{}",
        dup.log()
    );
    dup.kill().unwrap();
}

/// The name's store moves only on purpose, and only one of two racing
/// instances takes it: the wallet stops cleanly (lease released), two
/// wallets with new folders and `--replace-store` start at once, exactly
/// one owns, the other exits naming it; the old folder's wallet is then
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_instances_racing_for_a_free_name_exactly_one_owns_it() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let status = sys
        .service(Kind::Wallet)
        .proc
        .sigterm_and_wait(Duration::from_secs(30))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(sys
        .service(Kind::Wallet)
        .proc
        .log()
        .contains("lease released"));
    let mut racers: Vec<Proc> = (2..=3)
        .map(|i| {
            let dir = sys.data_dir(&format!("wallet-{i}"));
            let mut p = sys.duplicate(Kind::Wallet, &format!("wallet-{i}"), &dir);
            p.set_env("TWOPC_REPLACE_STORE", Some("true"));
            p
        })
        .collect();
    for r in &mut racers {
        r.start().unwrap();
    }
    let (winner, loser) = poll_until(
        "one racer to own, the other to exit",
        Duration::from_secs(30),
        || {
            let state: Vec<(bool, bool)> = racers
                .iter_mut()
                .map(|r| (r.log().contains("OWNER:"), r.is_running()))
                .collect();
            async move {
                match state.as_slice() {
                    [(true, true), (false, false)] => Ok((0, 1)),
                    [(false, false), (true, true)] => Ok((1, 0)),
                    other => Err(format!("(owns, running) = {other:?}")),
                }
            }
        },
    )
    .await;
    let lost = racers[loser].log();
    assert!(
        lost.contains("not serving")
            && lost.contains(&format!("pid {} ", racers[winner].pid().unwrap())),
        "the loser names the winner:\n{lost}"
    );
    // The old data folder is no longer the wallet.
    sys.service(Kind::Wallet).proc.start().unwrap();
    let status = exit_of(&mut sys.service(Kind::Wallet).proc, Duration::from_secs(30)).await;
    assert!(!status.contains("exit status: 0"), "{status}");
    let log = sys.service(Kind::Wallet).proc.log();
    assert!(
        log.contains("not serving: the name belongs to store"),
        "{log}"
    );
    racers[winner].kill().unwrap();
}

/// An owner frozen by SIGSTOP keeps its connection and its folder's lock;
/// a successor started on the same folder takes over only once the lease
/// lapsed, serves, and the old owner, woken, writes nothing and exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_when_it_wakes() {
    let lease_ms = 1_500u64;
    let opts = Options::default().set(Kind::Wallet, "TWOPC_LEASE_MS", &lease_ms.to_string());
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();
    let r = sys.purchase("alice", "pen-1", 1, 199).await;
    assert_eq!(r.outcome, Outcome::Committed);
    let mut told_all = vec![Told::Committed(tx_id(&r))];

    sys.service(Kind::Wallet).proc.pause().unwrap();
    let paused_at = Instant::now();
    let dir = sys.data_dir("wallet");
    let mut successor = sys.duplicate(Kind::Wallet, "wallet-next", &dir);
    successor.start().unwrap();
    wait_log(&successor, 0, "STANDBY", Duration::from_secs(20)).await;
    // Purchases while the owner is frozen: the server still hands it some
    // prepares (it keeps its subscriptions), which it will find on waking.
    let mut asked = vec![];
    for i in 0..6 {
        let r = sys
            .purchase_with(
                &request("bob", format!("frozen-{i}")),
                Duration::from_secs(15),
            )
            .await;
        told_all.push(told(&r));
        asked.push(r);
    }
    wait_log(&successor, 0, "OWNER:", Duration::from_secs(20)).await;
    assert!(
        paused_at.elapsed() >= Duration::from_millis(lease_ms),
        "took over before the lease could lapse"
    );
    // The successor serves. The server still hands the frozen process its
    // share of prepares until it drops the connection; those time out and
    // abort (safe), nothing else may.
    let mut served = 0;
    for i in 0..8 {
        let r = sys
            .purchase_with(
                &request("alice", format!("after-{i}")),
                Duration::from_secs(15),
            )
            .await;
        match &r {
            Ok(Reply::Ok(p)) if p.outcome == Outcome::Committed => served += 1,
            Ok(Reply::Ok(p)) => {
                let why = p.reason.as_ref().expect("an abort says why");
                assert_eq!(
                    (why.participant.as_str(), why.code),
                    ("wallet", Code::Timeout),
                    "{p:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        told_all.push(told(&r));
    }
    assert!(served > 0, "the successor served none of 8 purchases");
    // Wake the old owner: it must refuse whatever it had buffered and exit.
    let woke_from = sys.service(Kind::Wallet).proc.log().len();
    sys.service(Kind::Wallet).proc.resume().unwrap();
    let status = exit_of(&mut sys.service(Kind::Wallet).proc, Duration::from_secs(30)).await;
    assert!(!status.contains("exit status: 0"), "{status}");
    let log = sys.service(Kind::Wallet).proc.log();
    let woke = &log[woke_from..];
    assert!(woke.contains("FENCED"), "{woke}");
    for wrote in ["prepared, voting yes", "decision applied", "batch durable"] {
        assert!(
            !woke.contains(wrote),
            "the woken owner wrote ({wrote}):\n{woke}"
        );
    }
    // The successor alone owns and serves now; everything adds up.
    assert!(successor.is_running());
    for _ in 0..5 {
        let r = sys.purchase("alice", "pen-1", 1, 199).await;
        assert_eq!(r.outcome, Outcome::Committed, "{r:?}");
        told_all.push(Told::Committed(tx_id(&r)));
    }
    // The wallet's folder is the successor's now: the harness reads it.
    sys.assert_consistent(&told_all).await;
    successor.kill().unwrap();
}

/// A rolling restart under load: buyers keep buying while a new wallet
/// starts on the same folder (standby), the old one gets SIGTERM, drains
/// and lets go, and the new one takes over; then the same back. Every
/// purchase is answered, none twice differently, and every invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_and_splits_nothing() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed(
        &[
            ("alice", 1_000_000),
            ("bob", 1_000_000),
            ("carol", 1_000_000),
        ],
        &[("pen-1", 199, 100_000)],
    )
    .await
    .unwrap();
    let sys = Arc::new(tokio::sync::Mutex::new(sys));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (shop, key_of) = {
        let s = sys.lock().await;
        let shop = s.shop.clone();
        (
            (shop.client.clone(), shop.purchase_subject()),
            move |rid: &str| shop.log_key(rid),
        )
    };
    let mut buyers = vec![];
    for (b, user) in ["alice", "bob", "carol"].into_iter().enumerate() {
        let (client, subject) = shop.clone();
        let stop = stop.clone();
        buyers.push(tokio::spawn(async move {
            let mut replies = vec![];
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let req = request(user, format!("roll-{b}-{i}"));
                let r = twopc_launcher::client::request::<_, twopc_schemas::api::PurchaseReply>(
                    &client,
                    &subject,
                    &req,
                    Duration::from_secs(15),
                )
                .await;
                replies.push((req, r));
                i += 1;
            }
            replies
        }));
    }
    let committed_so_far = |s: &System| s.snapshot().debits.len();
    {
        let mut s = sys.lock().await;
        poll_until("purchases to flow", Duration::from_secs(30), || {
            let n = committed_so_far(&s);
            async move {
                if n >= 20 {
                    Ok(())
                } else {
                    Err(format!("{n} debits"))
                }
            }
        })
        .await;
        for round in 0..2 {
            let dir = s.data_dir("wallet");
            let mut next = s.duplicate(Kind::Wallet, &format!("wallet-roll-{round}"), &dir);
            next.start().unwrap();
            wait_log(&next, 0, "STANDBY", Duration::from_secs(20)).await;
            let status = s
                .service(Kind::Wallet)
                .proc
                .sigterm_and_wait(Duration::from_secs(30))
                .await
                .unwrap();
            assert!(
                status.success(),
                "the old wallet drained and exited: {status:?}"
            );
            wait_log(&next, 0, "OWNER:", Duration::from_secs(20)).await;
            let before = committed_so_far(&s);
            poll_until(
                "purchases through the new owner",
                Duration::from_secs(30),
                || {
                    let n = committed_so_far(&s);
                    async move {
                        if n >= before + 20 {
                            Ok(())
                        } else {
                            Err(format!("{n} debits"))
                        }
                    }
                },
            )
            .await;
            // The new instance becomes the service (the old one's slot).
            std::mem::swap(&mut s.service(Kind::Wallet).proc, &mut next);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut told_all = vec![];
    let mut keys = vec![];
    let (mut committed, mut aborted) = (0, vec![]);
    for b in buyers {
        for (req, r) in b.await.unwrap() {
            match &r {
                Ok(Reply::Ok(p)) => {
                    match p.outcome {
                        Outcome::Committed => committed += 1,
                        Outcome::Aborted => aborted.push(p.reason.clone()),
                    }
                    keys.push(KeyReply {
                        request_id: key_of(req.request_id.as_deref().unwrap()),
                        tx: tx_id(p),
                        outcome: p.outcome,
                        duplicate: p.duplicate,
                    });
                }
                other => panic!("purchase {req:?} not answered: {other:?}"),
            }
            told_all.push(told(&r));
        }
    }
    eprintln!(
        "rolling restart: {committed} committed, {} aborted: {aborted:?}",
        aborted.len()
    );
    let s = sys.lock().await;
    s.assert_consistent_keys(&told_all, &keys).await;
    assert!(
        aborted.is_empty(),
        "a rolling restart aborted purchases: {aborted:?}"
    );
}

/// On a server without JetStream there is no lease: instances ask each
/// other. The second with its own data exits naming the first; one on the
/// first's folder waits, and takes over when the first stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_jetstream_instances_ask_each_other() {
    let dir = tempfile::Builder::new()
        .prefix("twopc-nojs-")
        .tempdir()
        .unwrap();
    let port = twopc_launcher::free_port().unwrap();
    let mut server = Proc::new(
        "nats",
        &twopc_launcher::find_nats_server().unwrap(),
        vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ],
        vec![],
        dir.path().join("nats.log"),
    );
    server.start().unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let wallet = |name: &str, folder: &str| {
        Proc::new(
            name,
            &harness::bins().wallet,
            vec![],
            vec![
                ("NATS_URL".into(), url.clone()),
                (
                    "TWOPC_DATA_DIR".into(),
                    dir.path().join(folder).display().to_string(),
                ),
            ],
            dir.path().join(format!("{name}.log")),
        )
    };
    let mut first = wallet("first", "a");
    first.start().unwrap();
    wait_log(&first, 0, "OWNER (no JetStream", Duration::from_secs(20)).await;
    wait_log(&first, 0, "participant serving", Duration::from_secs(20)).await;

    let mut other = wallet("other", "b");
    other.start().unwrap();
    let status = exit_of(&mut other, Duration::from_secs(20)).await;
    assert!(!status.contains("exit status: 0"), "{status}");
    let log = other.log();
    assert!(
        log.contains("not serving") && log.contains(&format!("pid {} ", first.pid().unwrap())),
        "{log}"
    );
    assert!(!log.contains("OWNER"), "{log}");

    // Two standbys of the same store: when the owner stops, exactly one
    // takes over (before, both kept hearing each other and backing off).
    let mut next = wallet("next", "a");
    next.start().unwrap();
    wait_log(&next, 0, "STANDBY", Duration::from_secs(20)).await;
    let mut second = wallet("second", "a");
    second.start().unwrap();
    wait_log(&second, 0, "STANDBY", Duration::from_secs(20)).await;
    assert!(!next.log().contains("OWNER") && !second.log().contains("OWNER"));
    let status = first
        .sigterm_and_wait(Duration::from_secs(30))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let owner_line = "OWNER (no JetStream";
    poll_until("one standby to take over", Duration::from_secs(20), || {
        let (a, b) = (next.log(), second.log());
        async move {
            if a.contains(owner_line) || b.contains(owner_line) {
                Ok(())
            } else {
                Err("neither owns the name".to_owned())
            }
        }
    })
    .await;
    // The other hears the new owner and keeps waiting; it never serves.
    let (new_owner, standby) = if next.log().contains(owner_line) {
        (&mut next, &mut second)
    } else {
        (&mut second, &mut next)
    };
    let new_pid = new_owner.pid().expect("running");
    wait_log(
        standby,
        0,
        &format!("(pid {new_pid} on"),
        Duration::from_secs(20),
    )
    .await;
    assert!(!standby.log().contains(owner_line), "{}", standby.log());
    new_owner.kill().unwrap();
    standby.kill().unwrap();
    server.kill().unwrap();
}

/// A server that starts without JetStream and is then restarted in place
/// (same port) with it, and a wallet that took its name by asking while
/// JetStream was off: the situation of finding 4 of issue 18.
struct JetStreamBack {
    dir: tempfile::TempDir,
    url: String,
    server: twopc_launcher::process::NatsServer,
    client: async_nats::Client,
    first: Proc,
}

impl JetStreamBack {
    fn wallet(dir: &std::path::Path, url: &str, name: &str, folder: &str) -> Proc {
        Proc::new(
            name,
            &harness::bins().wallet,
            vec![],
            vec![
                ("NATS_URL".into(), url.to_owned()),
                (
                    "TWOPC_DATA_DIR".into(),
                    dir.join(folder).display().to_string(),
                ),
            ],
            dir.join(format!("{name}.log")),
        )
    }

    /// Starts the server without JetStream and `first` on folder `a`,
    /// waits until it serves by asking, restarts the server with JetStream
    /// (and the owners bucket, which the coordinator makes), and waits
    /// until `first` answers on the owner subject again.
    async fn start() -> JetStreamBack {
        let dir = tempfile::Builder::new()
            .prefix("twopc-jsback-")
            .tempdir()
            .unwrap();
        let port = twopc_launcher::free_port().unwrap();
        let mut bare = Proc::new(
            "nats-bare",
            &twopc_launcher::find_nats_server().unwrap(),
            vec![
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ],
            vec![],
            dir.path().join("nats-bare.log"),
        );
        bare.start().unwrap();
        let url = format!("nats://127.0.0.1:{port}");
        let mut first = Self::wallet(dir.path(), &url, "first", "a");
        first.start().unwrap();
        wait_log(&first, 0, "OWNER (no JetStream", Duration::from_secs(20)).await;
        wait_log(&first, 0, "participant serving", Duration::from_secs(20)).await;
        bare.kill().unwrap();
        let server = twopc_launcher::process::NatsServer::start(&dir.path().join("js"), Some(port))
            .await
            .unwrap();
        let client = async_nats::connect(&url).await.unwrap();
        twopc_coordinator::kv::ensure_owner_bucket(client.clone(), 1).await;
        let pid = first.pid().unwrap();
        poll_until(
            "the first wallet to answer on the owner subject again",
            Duration::from_secs(30),
            || {
                let client = client.clone();
                async move {
                    let m = tokio::time::timeout(
                        Duration::from_secs(2),
                        client.request("twopc.wallet.owner", "{}".into()),
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                    let a = twopc_schemas::ownership::OwnerPing::parse(&m.payload)?;
                    if a.pid == pid && a.serving {
                        Ok(())
                    } else {
                        Err(format!("{a:?}"))
                    }
                }
            },
        )
        .await;
        JetStreamBack {
            dir,
            url,
            server,
            client,
            first,
        }
    }
}

/// Finding 4 of issue 18: a wallet with its own data started once the
/// server has JetStream again finds no lease, but the name is served by an
/// instance that asks (the first, which found JetStream off). It must not
/// serve beside it, nor bind the name to its own store: it exits naming
/// the first, and no lease is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_candidate_of_another_store_refuses_a_name_served_without_a_lease() {
    let mut t = JetStreamBack::start().await;
    let mut other = JetStreamBack::wallet(t.dir.path(), &t.url, "other", "b");
    other.start().unwrap();
    let status = exit_of(&mut other, Duration::from_secs(20)).await;
    assert!(!status.contains("exit status: 0"), "{status}");
    let log = other.log();
    assert!(
        log.contains("not serving") && log.contains(&format!("pid {} ", t.first.pid().unwrap())),
        "{log}"
    );
    assert!(!log.contains("OWNER"), "{log}");
    let name = twopc_schemas::ParticipantName::new("wallet").unwrap();
    let lease = twopc_participant::ownership::read_lease(&t.client, &name)
        .await
        .unwrap();
    assert!(lease.is_none(), "the name was bound to a store: {lease:?}");
    assert!(t.first.is_running(), "{}", t.first.log());
    t.first.kill().unwrap();
    t.server.proc.kill().unwrap();
}

/// Finding 4 of issue 18: a wallet on the first's folder started once the
/// server has JetStream again takes the lease but serves nothing while the
/// first (serving by asking) claims the name; the first gives way to the
/// lease holder of its store and exits, and only then does the lease
/// holder serve. At no point do both serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holder_serves_only_once_the_owner_without_a_lease_gave_way() {
    let mut t = JetStreamBack::start().await;
    let mut next = JetStreamBack::wallet(t.dir.path(), &t.url, "next", "a");
    next.start().unwrap();
    let first_fenced = poll_until(
        "the second wallet to own the name",
        Duration::from_secs(30),
        || {
            // Its log first: the first's fencing comes before the second
            // can own, so reading the first's log after still sees it.
            let next_owns = next.log().contains("OWNER:");
            let first_log = t.first.log();
            async move {
                if next_owns {
                    Ok(first_log.contains("FENCED"))
                } else {
                    Err("not yet".to_owned())
                }
            }
        },
    )
    .await;
    assert!(
        first_fenced,
        "the second wallet owns the name while the first still serves it:\n{}\n---\n{}",
        t.first.log(),
        next.log()
    );
    let status = exit_of(&mut t.first, Duration::from_secs(20)).await;
    assert!(!status.contains("exit status: 0"), "{status}");
    assert!(
        t.first.log().contains("holds the lease for this store"),
        "{}",
        t.first.log()
    );
    assert!(next.log().contains("STANDBY:"), "{}", next.log());
    let name = twopc_schemas::ParticipantName::new("wallet").unwrap();
    let (lease, _) = twopc_participant::ownership::read_lease(&t.client, &name)
        .await
        .unwrap()
        .expect("a lease");
    assert_eq!(lease.owner.map(|h| h.pid), next.pid());
    next.kill().unwrap();
    t.server.proc.kill().unwrap();
}
