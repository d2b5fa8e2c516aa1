//! Operating twopc: the NATS services protocol (`nats micro`), error
//! headers, and graceful shutdown on SIGTERM.

mod harness;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use harness::{poll_until, told, Options, System, PURCHASE};
use twopc::launcher::Kind;
use twopc_common::micro::{Info, Ping, Stats};
use twopc_schemas::api::{CoordinatorInDoubt, Outcome, PurchaseRequest};
use twopc_schemas::points::ParticipantDelay;
use twopc_schemas::{participant, subjects};

/// Sends one request to a subject every instance answers and collects
/// replies until `expected` have come, or `timeout` passes (then it returns
/// what came, for the caller's assertion to show).
async fn gather(
    client: &async_nats::Client,
    subject: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<Vec<u8>> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subject.to_owned(), inbox, "".into())
        .await
        .unwrap();
    let mut out = vec![];
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < expected {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(m)) => out.push(m.payload.to_vec()),
            _ => break,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_answer_the_nats_micro_protocol_with_counts() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    let ok = sys.purchase("alice", "book-1", 1, 1_250).await;
    assert_eq!(ok.outcome, Outcome::Committed);
    let bad = sys.raw(PURCHASE.as_str(), b"{").await.unwrap();
    assert!(String::from_utf8_lossy(&bad).contains("malformed_json"));

    // $SRV.PING: every service answers, once: the first three replies come
    // from three different services.
    let pings: Vec<Ping> = gather(&sys.client, "$SRV.PING", 3, Duration::from_secs(5))
        .await
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect();
    let mut names: Vec<&str> = pings.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["coordinator", "order", "wallet"]);
    assert!(pings
        .iter()
        .all(|p| p.kind == "io.nats.micro.v1.ping_response" && !p.id.is_empty()));
    // Each says which protocol layouts it speaks (kind:version).
    for p in &pings {
        assert_eq!(
            p.metadata.get("twopc_speaks").map(String::as_str),
            Some(twopc_schemas::protocol::speaks_text().as_str()),
            "{}",
            p.name
        );
    }
    assert_eq!(
        twopc_schemas::protocol::speaks_text(),
        "1:2,2:1,3:1,4:1,5:1,6:1,7:1"
    );

    // $SRV.INFO.wallet: its endpoints and subjects.
    let info: Info =
        serde_json::from_slice(&sys.raw("$SRV.INFO.wallet", b"").await.unwrap()).unwrap();
    assert_eq!(info.kind, "io.nats.micro.v1.info_response");
    let endpoints: BTreeMap<&str, &str> = info
        .endpoints
        .iter()
        .map(|e| (e.name.as_str(), e.subject.as_str()))
        .collect();
    assert_eq!(endpoints.get("prepare"), Some(&"twopc.wallet.prepare"));
    assert_eq!(endpoints.get("decide"), Some(&"twopc.wallet.decide"));
    assert_eq!(endpoints.get("balance"), Some(&"wallet.balance"));
    assert_eq!(endpoints.get("create-user"), Some(&"wallet.users.create"));
    assert_eq!(endpoints.get("tx-status"), Some(&"wallet.tx"));
    assert!(!info.description.is_empty());

    // $SRV.STATS.coordinator: the purchase endpoint counted both requests
    // and the error.
    let stats: Stats =
        serde_json::from_slice(&sys.raw("$SRV.STATS.coordinator", b"").await.unwrap()).unwrap();
    let purchase = stats
        .endpoints
        .iter()
        .find(|e| e.name == "purchase")
        .unwrap();
    assert_eq!(purchase.num_requests, 2, "{stats:?}");
    assert_eq!(purchase.num_errors, 1, "{stats:?}");
    assert!(
        purchase.last_error.starts_with("400:malformed_json"),
        "{stats:?}"
    );
    assert!(purchase.processing_time > 0);
    // And by id.
    let by_id: Ping = serde_json::from_slice(
        &sys.raw(&format!("$SRV.PING.coordinator.{}", stats.id), b"")
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(by_id.id, stats.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_carry_service_error_headers_and_a_json_body() {
    let mut sys = System::start(Options::default()).await.unwrap();
    sys.seed_standard().await.unwrap();
    for (subject, body, code, status) in [
        (PURCHASE.as_str(), &b"{"[..], "malformed_json", "400"),
        (
            subjects::WALLET_BALANCE,
            br#"{"user":"nobody"}"#,
            "unknown_user",
            "404",
        ),
        (
            subjects::ORDER_CREATE_PRODUCT,
            br#"{"sku":"book-1","price":1,"stock":1}"#,
            "already_exists",
            "409",
        ),
    ] {
        let req = async_nats::Request::new()
            .payload(body.to_vec().into())
            .timeout(Some(Duration::from_secs(5)));
        let msg = sys
            .client_for(subject)
            .send_request(subject.to_owned(), req)
            .await
            .unwrap();
        let headers = msg.headers.expect("error headers");
        assert_eq!(
            headers.get("Nats-Service-Error-Code").unwrap().as_str(),
            status,
            "{subject}"
        );
        assert!(
            headers
                .get("Nats-Service-Error")
                .unwrap()
                .as_str()
                .starts_with(code),
            "{subject}"
        );
        let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["error"]["code"], code, "{subject}");
    }
    // A successful reply has no error headers.
    let req = async_nats::Request::new()
        .payload(br#"{"user":"alice"}"#.to_vec().into())
        .timeout(Some(Duration::from_secs(5)));
    let msg = sys
        .client
        .send_request(subjects::WALLET_BALANCE, req)
        .await
        .unwrap();
    assert!(msg
        .headers
        .is_none_or(|h| h.get("Nats-Service-Error").is_none()));
}

/// SIGTERM while purchases are in flight: the coordinator stops taking
/// purchases, finishes those in flight, exits 0; after a restart every
/// transaction is consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_purchases_and_exits_cleanly() {
    // The wallet takes 300 ms to prepare, so purchases are in flight when
    // the signal lands.
    let opts = Options::default().set(
        Kind::Wallet,
        "TWOPC_DELAY",
        &format!("{}:300", ParticipantDelay::Prepare.at(&participant::WALLET)),
    );
    let mut sys = System::start(opts).await.unwrap();
    sys.seed(&[("erin", 1_000_000)], &[("mug-1", 300, 1_000)])
        .await
        .unwrap();
    let mut tasks = vec![];
    for i in 0..20 {
        let client = sys.shop.client.clone();
        tasks.push(tokio::spawn(async move {
            let req = PurchaseRequest {
                user: "erin".into(),
                sku: "mug-1".into(),
                qty: 1,
                amount: 300,
                request_id: Some(format!("drain-{i}")),
            };
            twopc::client::request::<_, twopc_schemas::api::PurchaseReply>(
                &client,
                PURCHASE.as_str(),
                &req,
                Duration::from_secs(5),
            )
            .await
        }));
    }
    // Signal only once every purchase has reached the coordinator (it is in
    // phase 1 or already answered) and some are still in phase 1.
    let coordinator_stats = || async {
        let raw = sys
            .raw("$SRV.STATS.coordinator", b"")
            .await
            .map_err(|e| e.to_string())?;
        let stats: Stats = serde_json::from_slice(&raw).map_err(|e| e.to_string())?;
        let answered = stats
            .endpoints
            .iter()
            .find(|e| e.name == "purchase")
            .map_or(0, |e| e.num_requests);
        let raw = sys
            .raw(subjects::IN_DOUBT, b"{}")
            .await
            .map_err(|e| e.to_string())?;
        let in_doubt: CoordinatorInDoubt =
            serde_json::from_slice(&raw).map_err(|e| e.to_string())?;
        let in_flight = in_doubt.in_progress.len() as u64;
        if in_flight > 0 && in_flight + answered >= 20 {
            Ok(())
        } else {
            Err(format!("{in_flight} in phase 1, {answered} answered"))
        }
    };
    poll_until(
        "all 20 purchases at the coordinator, some in phase 1",
        Duration::from_secs(5),
        coordinator_stats,
    )
    .await;
    let t0 = Instant::now();
    let status = sys
        .service(Kind::Coordinator)
        .proc
        .sigterm_and_wait(Duration::from_secs(15))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let log = sys.service(Kind::Coordinator).proc.log();
    assert!(
        log.contains("draining") && log.contains("drained; exiting"),
        "{log}"
    );
    eprintln!("coordinator drained and exited in {:?}", t0.elapsed());

    let mut told_all = vec![];
    let mut answered = 0;
    for t in tasks {
        let r = t.await.unwrap();
        if let Ok(twopc::client::Reply::Ok(_)) = &r {
            answered += 1;
        }
        told_all.push(told(&r));
    }
    assert_eq!(
        answered, 20,
        "every purchase in flight at SIGTERM was answered"
    );

    sys.service(Kind::Coordinator).proc.start().unwrap();
    sys.wait_ready(Kind::Coordinator).await.unwrap();
    let s = sys.assert_consistent(&told_all).await;
    assert_eq!(s.debits.len(), 20);
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_serve_prometheus_metrics() {
    let ports: Vec<u16> = (0..3)
        .map(|_| twopc::launcher::free_port().unwrap())
        .collect();
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let opts = Options::default()
        .set(Kind::Coordinator, "TWOPC_METRICS_ADDR", &addr(0))
        .set(Kind::Wallet, "TWOPC_METRICS_ADDR", &addr(1))
        .set(Kind::Order, "TWOPC_METRICS_ADDR", &addr(2));
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();
    assert_eq!(
        sys.purchase("alice", "book-1", 1, 1_250).await.outcome,
        Outcome::Committed
    );
    assert_eq!(
        sys.purchase("carol", "book-1", 1, 1_250).await.outcome,
        Outcome::Aborted
    );
    sys.wait_quiescent(Duration::from_secs(10)).await.unwrap();

    let coordinator = http_get(&addr(0), "/metrics");
    assert!(
        coordinator.starts_with("HTTP/1.1 200") || coordinator.starts_with("HTTP/1.0 200"),
        "{coordinator}"
    );
    for line in [
        "twopc_transactions_begun_total 2",
        "twopc_transactions_committed_total 1",
        "twopc_transactions_aborted_total{reason=\"insufficient_funds\"} 1",
        "twopc_purchase_seconds_count 2",
        "twopc_prepare_seconds_bucket{le=",
        "twopc_log_batch_size_bucket{log=\"coordinator\",le=",
        "# TYPE twopc_transactions_committed_total counter",
    ] {
        assert!(
            coordinator.contains(line),
            "coordinator metrics lack {line:?}:\n{coordinator}"
        );
    }
    let wallet = http_get(&addr(1), "/metrics");
    for line in [
        "twopc_votes_total{vote=\"yes\"} 1",
        "twopc_votes_total{vote=\"no\"} 1",
        "twopc_decisions_applied_total{decision=\"commit\"} 1",
        "twopc_in_doubt 0",
        "twopc_log_commit_seconds_bucket{log=\"wallet\",le=",
    ] {
        assert!(
            wallet.contains(line),
            "wallet metrics lack {line:?}:\n{wallet}"
        );
    }
    let order = http_get(&addr(2), "/metrics");
    assert!(
        order.contains("twopc_votes_total{vote=\"yes\"} 2"),
        "{order}"
    );
}

/// JSON logs carry the transaction id, and one purchase is one trace: the
/// client's `traceparent` reaches the coordinator and both participants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_tx_and_one_trace_across_services() {
    let mut opts = Options::default();
    for kind in [Kind::Coordinator, Kind::Wallet, Kind::Order] {
        opts = opts.set(kind, "TWOPC_LOG_FORMAT", "json");
    }
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").as_str(),
    );
    let req = async_nats::Request::new()
        .headers(headers)
        .payload(
            br#"{"user":"alice","sku":"book-1","qty":1,"amount":1250}"#
                .to_vec()
                .into(),
        )
        .timeout(Some(Duration::from_secs(10)));
    let msg = sys
        .shop
        .client
        .send_request(PURCHASE.as_str(), req)
        .await
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(reply["outcome"], "committed", "{reply}");
    let tx = reply["tx"].as_str().unwrap().to_owned();
    sys.wait_quiescent(Duration::from_secs(10)).await.unwrap();

    for kind in [Kind::Coordinator, Kind::Wallet, Kind::Order] {
        let log = sys.service(kind).proc.log();
        let mut lines_of_tx = 0;
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{} log line is not JSON ({e}): {line}", kind.name()));
            let spans = v["spans"].as_array().cloned().unwrap_or_default();
            if spans.iter().any(|s| s["tx"] == tx.as_str()) {
                lines_of_tx += 1;
                assert!(
                    spans.iter().any(|s| s["trace_id"] == trace_id),
                    "{} line of tx {tx} without the trace: {line}",
                    kind.name()
                );
            }
        }
        assert!(
            lines_of_tx >= 2,
            "{} logged {lines_of_tx} lines for tx {tx}:\n{log}",
            kind.name()
        );
    }
}

fn find_chromium() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("CHROMIUM_BIN") {
        return Some(p.into());
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.is_file())
}

/// The status page shows counters, what is in doubt and the participants'
/// health, as JSON and as a page that a real browser (headless Chromium)
/// renders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_counters_in_doubt_and_health_in_a_browser() {
    let port = twopc::launcher::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let opts = Options::default()
        .set(Kind::Coordinator, "TWOPC_HTTP_ADDR", &addr)
        .set(Kind::Coordinator, "TWOPC_PREPARE_TIMEOUT_MS", "500")
        .set(Kind::Coordinator, "TWOPC_RETRY_BASE_MS", "200");
    let mut sys = System::start(opts).await.unwrap();
    sys.seed_standard().await.unwrap();
    assert_eq!(
        sys.purchase("alice", "book-1", 1, 1_250).await.outcome,
        Outcome::Committed
    );
    assert_eq!(
        sys.purchase("carol", "book-1", 1, 1_250).await.outcome,
        Outcome::Aborted
    );
    // Freeze the order service: the next purchase times out there, and its
    // abort cannot be delivered to it — one decision in doubt.
    sys.service(Kind::Order).proc.pause().unwrap();
    let stuck = sys.purchase("alice", "pen-1", 1, 199).await;
    assert_eq!(stuck.outcome, Outcome::Aborted);

    let json = http_get(&addr, "/status.json");
    let body = json.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["committed"], 1, "{v}");
    assert_eq!(v["aborted"], 2, "{v}");
    let undelivered = v["coordinator"]["undelivered"].as_array().unwrap();
    assert!(
        undelivered
            .iter()
            .any(|u| u["tx"] == stuck.tx.as_str() && u["pending"][0] == "order"),
        "{v}"
    );
    let health: BTreeMap<String, bool> = v["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["up"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(health.get("wallet"), Some(&true), "{v}");
    assert_eq!(health.get("order"), Some(&false), "{v}");
    assert_eq!(v["recent"].as_array().unwrap().len(), 3);

    let page = http_get(&addr, "/");
    assert!(page.contains("<h1>twopc coordinator</h1>"), "{page}");
    assert!(page.contains(&stuck.tx), "the in-doubt tx is listed");
    assert!(page.contains("unreachable"));
    assert!(
        page.to_ascii_lowercase()
            .contains("content-type: text/html; charset=utf-8"),
        "{page}"
    );
    let missing = http_get(&addr, "/nope");
    assert!(missing.starts_with("HTTP/1.0 404"), "{missing}");

    // A client that connects and never sends its request is disconnected
    // once the header read timeout passes (checked while Chromium runs).
    let idle = {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let limit_ms = twopc_coordinator::status::HEADER_READ_TIMEOUT_MS;
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(limit_ms + 5_000)))
                .unwrap();
            let t0 = Instant::now();
            // Closed: end of stream (after a 408, if any) or a reset; a
            // read that times out means the server kept it open.
            let closed = match s.read_to_end(&mut vec![]) {
                Ok(_) => true,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            };
            (closed, t0.elapsed(), limit_ms)
        })
    };

    // A real browser renders it.
    let chromium =
        find_chromium().expect("chromium is needed for this test: scripts/test.sh installs it");
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("status.png");
    let out = std::process::Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,900",
            &format!("--user-data-dir={}", dir.path().join("profile").display()),
            &format!("--screenshot={}", shot.display()),
            &format!("http://{addr}/"),
        ])
        .output()
        .unwrap();
    assert!(
        shot.is_file(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1280, 900));
    let px = info.color_type.samples();
    let pixels = &buf[..info.buffer_size()];
    let non_white = pixels
        .chunks(px)
        .filter(|p| p.iter().take(3).any(|&c| c < 200))
        .count();
    let greenish = pixels
        .chunks(px)
        .filter(|p| p.len() >= 3 && p[1] > 100 && p[0] < 80 && p[2] < 110)
        .count();
    let total = (info.width * info.height) as usize;
    // Text and tables cover a visible share of the page; the green of the
    // "up" and "commit" cells is there.
    assert!(
        non_white * 100 > total,
        "page looks blank: {non_white} of {total} pixels drawn"
    );
    assert!(
        greenish > 20,
        "no green status cells rendered ({greenish} px)"
    );
    let keep = std::env::temp_dir().join("twopc-status-page.png");
    let _ = std::fs::copy(&shot, &keep);
    eprintln!("screenshot: {}", keep.display());

    let (closed, after, limit_ms) = idle.await.unwrap();
    assert!(
        closed && after < Duration::from_millis(limit_ms + 5_000),
        "a silent connection was not closed after {limit_ms} ms (waited {after:?})"
    );

    sys.service(Kind::Order).proc.resume().unwrap();
    let told_all = [twopc::check::Told::Aborted(stuck.tx.parse().unwrap())];
    sys.assert_consistent(&told_all).await;
}
