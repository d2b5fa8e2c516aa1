//! TLS on the bus (issue 11), as an option beside the NKey credentials: a
//! system started with the files of `scripts/make-ca.sh` and mutual TLS.
//! Purchases commit with every service on TLS, and the CLI connects with the
//! nats CLI's TLS flags; the server refuses a client without a client
//! certificate, one that does not trust the CA, one whose certificate
//! another CA signed, and a plain TCP client, each with its NKey right.
//!
//! Needs `openssl` (the script makes the certificates with it): without it
//! each test says SKIPPED and passes.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use twopc_common::nats::{AuthArgs, ConnectSettings};
use twopc_launcher::client::{request, Reply};
use twopc_launcher::tls::{openssl_available, TlsFiles};
use twopc_launcher::{Binaries, ReplyAfter, System, SystemConfig};
use twopc_schemas::api::{CreateProduct, CreateUser, Outcome, PurchaseReply, PurchaseRequest};

/// alice with 10,000 and book-1 at 1,250 ×10.
async fn seed_alice(sys: &System) {
    sys.seed(
        &[CreateUser {
            user: "alice".into(),
            balance: 10_000,
        }],
        &[CreateProduct {
            sku: "book-1".into(),
            price: 1_250,
            stock: 10,
        }],
        false,
    )
    .await
    .unwrap();
}

fn bins() -> Binaries {
    Binaries {
        coordinator: env!("CARGO_BIN_EXE_twopc-coordinator").into(),
        wallet: env!("CARGO_BIN_EXE_twopc-wallet").into(),
        order: env!("CARGO_BIN_EXE_twopc-order").into(),
    }
}

/// The files of `scripts/make-ca.sh` in `dir`; `None` (and a SKIPPED line)
/// without openssl.
fn make_ca(dir: &Path) -> Option<TlsFiles> {
    if let Err(why) = openssl_available() {
        eprintln!("SKIPPED: the TLS tests need openssl to make a test CA: {why}");
        return None;
    }
    Some(TlsFiles::make(dir).expect("scripts/make-ca.sh"))
}

/// A system with mutual TLS, seeded with alice (10,000) and book-1 (1,250,
/// 10 in stock).
async fn start(dir: &Path, tls: &TlsFiles) -> System {
    let mut cfg = SystemConfig::new(&dir.join("system"), bins());
    cfg.client_name = "twopc-tls-test".into();
    cfg.tls = Some(tls.clone());
    // Balances are read right after a reply: answer after the delivery.
    cfg.coordinator.reply_after = Some(ReplyAfter::Delivery);
    let sys = System::start(cfg).await.expect("start a system with TLS");
    seed_alice(&sys).await;
    sys
}

/// A one-shot connection to the system's server with `auth`.
async fn connect(sys: &System, auth: &AuthArgs) -> anyhow::Result<async_nats::Client> {
    twopc_common::nats::connect_with(
        &sys.url,
        &ConnectSettings::fail_fast("test-tls").with_auth(auth),
    )
    .await
}

/// The server's `/varz` or `/connz` as JSON.
async fn monitor(sys: &System, path: &str) -> serde_json::Value {
    let url = format!("{}{path}", sys.nats.as_ref().unwrap().monitor_url());
    let (status, body) = twopc_launcher::http_get(&url, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(status, 200, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Runs the CLI with `args` and nothing from this process's NATS
/// environment; (success, stdout, stderr).
fn twopc(sys: &System, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twopc"))
        .args(args)
        .env("NATS_URL", &sys.url)
        .env("TWOPC_CREDS_DIR", &sys.creds.as_ref().unwrap().dir)
        .env_remove("NATS_CA")
        .env_remove("NATS_CERT")
        .env_remove("NATS_KEY")
        .env_remove("NATS_NKEY")
        .env_remove("NATS_CREDS")
        .output()
        .expect("run twopc");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_commit_and_the_cli_buys_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tls) = make_ca(&dir.path().join("tls")) else {
        return;
    };
    let sys = start(dir.path(), &tls).await;

    // The server requires TLS and a client certificate.
    let varz = monitor(&sys, "/varz").await;
    assert_eq!(varz["tls_required"], true, "{varz}");
    assert_eq!(varz["tls_verify"], true, "{varz}");

    let reply = match request::<_, PurchaseReply>(
        &sys.shop.client,
        &sys.shop.purchase_subject(),
        &PurchaseRequest {
            user: "alice".into(),
            sku: "book-1".into(),
            qty: 2,
            amount: 2_500,
            request_id: Some("tls-1".into()),
        },
        Duration::from_secs(15),
    )
    .await
    .unwrap()
    {
        Reply::Ok(r) => r,
        Reply::Err(e) => panic!("purchase refused: {e:?}"),
    };
    assert_eq!(reply.outcome, Outcome::Committed, "{reply:?}");

    // Every connection the server has, the services' included, is TLS.
    let connz = monitor(&sys, "/connz").await;
    let conns = connz["connections"].as_array().unwrap();
    let names: Vec<&str> = conns.iter().filter_map(|c| c["name"].as_str()).collect();
    for service in ["coordinator", "wallet", "order"] {
        assert!(
            names.iter().any(|n| n.contains(service)),
            "{service} is connected: {names:?}"
        );
    }
    for c in conns {
        assert!(
            c["tls_version"]
                .as_str()
                .is_some_and(|v| v.starts_with("1.")),
            "a connection without TLS: {c}"
        );
    }

    // The CLI with the nats CLI's TLS flags (and its NKey from the creds
    // folder) buys and reads.
    let ca = tls.ca.to_str().unwrap();
    let cert = tls.client_cert.to_str().unwrap();
    let key = tls.client_key.to_str().unwrap();
    let flags = ["--tlsca", ca, "--tlscert", cert, "--tlskey", key];
    let (ok, out, err) = twopc(
        &sys,
        &[
            &flags[..],
            &["purchase", "--user", "alice", "--sku", "book-1"],
        ]
        .concat(),
    );
    assert!(ok, "{out}{err}");
    let bought: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(bought["outcome"], "committed", "{out}");
    let (ok, out, err) = twopc(&sys, &[&flags[..], &["balance", "alice"]].concat());
    assert!(ok, "{out}{err}");
    let balance: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(balance["balance"], 10_000 - 2_500 - 1_250, "{out}");

    // Without them the same CLI, NKey and all, is refused.
    let (ok, out, err) = twopc(&sys, &["balance", "alice"]);
    assert!(!ok && err.contains("UnknownIssuer"), "{out}{err}");

    sys.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_or_trust_in_the_ca_or_tls_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tls) = make_ca(&dir.path().join("tls")) else {
        return;
    };
    // A second CA, with a client certificate of its own.
    let other = TlsFiles::make(&dir.path().join("other-ca")).unwrap();
    let sys = start(dir.path(), &tls).await;
    let nkey = sys.creds.as_ref().unwrap().auth("web");

    // The right everything works (the refusals below are about TLS).
    connect(&sys, &tls.client(nkey.clone())).await.unwrap();

    // The right NKey and the CA, but no client certificate: the server ends
    // the handshake.
    let no_cert = AuthArgs {
        tls_ca: Some(tls.ca.clone()),
        ..nkey.clone()
    };
    refused(&sys, &no_cert, "CertificateRequired").await;
    server_logged(
        &sys,
        "TLS handshake error: tls: client didn't provide a certificate",
    )
    .await;

    // A client that does not trust the CA refuses the server's certificate:
    // with its certificate but the system's roots instead of the CA, with
    // no TLS settings at all (async-nats upgrades to TLS because the server
    // requires it), and trusting another CA (made with the same subject, so
    // the signature is what fails).
    let no_ca = AuthArgs {
        tls_cert: Some(tls.client_cert.clone()),
        tls_key: Some(tls.client_key.clone()),
        ..nkey.clone()
    };
    refused(&sys, &no_ca, "invalid peer certificate: UnknownIssuer").await;
    refused(&sys, &nkey, "invalid peer certificate: UnknownIssuer").await;
    refused(
        &sys,
        &other.client(nkey.clone()),
        "invalid peer certificate",
    )
    .await;

    // Trusting the CA but presenting a certificate another CA signed.
    let foreign_cert = AuthArgs {
        tls_ca: Some(tls.ca.clone()),
        tls_cert: Some(other.client_cert.clone()),
        tls_key: Some(other.client_key.clone()),
        ..nkey.clone()
    };
    refused(&sys, &foreign_cert, "UnknownCA").await;
    server_logged(&sys, "x509: certificate signed by unknown authority").await;

    // Plain TCP, as a client that ignores `tls_required`: the server says it
    // requires TLS and a certificate, and closes the connection on the
    // plain CONNECT without a word (no PONG, no -ERR; without TLS it would
    // answer, at least with an authorization error).
    let port = sys.nats.as_ref().unwrap().port;
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    assert!(info.starts_with("INFO "), "{info}");
    let info: serde_json::Value = serde_json::from_str(&info["INFO ".len()..]).unwrap();
    assert_eq!(info["tls_required"], true, "{info}");
    assert_eq!(info["tls_verify"], true, "{info}");
    let mut plain = stream;
    plain
        .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\nPING\r\n")
        .unwrap();
    let mut rest = vec![];
    // Ok: the server closed it (a read timeout would be an error).
    let read = reader.read_to_end(&mut rest);
    assert!(
        read.is_ok() && rest.is_empty(),
        "the server answered a plain client ({read:?}): {:?}",
        String::from_utf8_lossy(&rest)
    );

    sys.stop(Duration::from_secs(5)).await.unwrap();
}

/// Connecting with `auth` fails with an error that says `why`.
async fn refused(sys: &System, auth: &AuthArgs, why: &str) {
    match connect(sys, auth).await {
        Ok(_) => panic!("connected with {auth:?}"),
        Err(e) => assert!(format!("{e:#}").contains(why), "{auth:?}: {e:#}"),
    }
}

/// Waits (up to 5 s) for the server's log to hold `line`.
async fn server_logged(sys: &System, line: &str) {
    let server = sys.nats.as_ref().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !server.proc.log().contains(line) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server did not log {line:?}:\n{}",
            server.proc.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_tls_needs_no_client_certificate_but_still_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tls) = make_ca(&dir.path().join("tls")) else {
        return;
    };
    let mut cfg = SystemConfig::new(&dir.path().join("system"), bins());
    cfg.tls = Some(tls.clone());
    cfg.mutual_tls = false;
    let sys = System::start(cfg).await.unwrap();
    let varz = monitor(&sys, "/varz").await;
    assert_eq!(varz["tls_required"], true, "{varz}");
    // (`/varz` leaves `tls_verify` out when it is false.)
    assert_ne!(varz["tls_verify"], true, "{varz}");
    let nkey = sys.creds.as_ref().unwrap().auth("admin");
    let ca_only = AuthArgs {
        tls_ca: Some(tls.ca.clone()),
        ..nkey.clone()
    };
    let admin = connect(&sys, &ca_only).await.unwrap();
    let r: Reply<serde_json::Value> = request(
        &admin,
        twopc_schemas::subjects::WALLET_CREATE_USER,
        &CreateUser {
            user: "dave".into(),
            balance: 1,
        },
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(matches!(r, Reply::Ok(_)), "{r:?}");
    refused(&sys, &nkey, "invalid peer certificate: UnknownIssuer").await;
    sys.stop(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_with_tls_on_clients_and_routes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tls) = make_ca(&dir.path().join("tls")) else {
        return;
    };
    let mut cfg = SystemConfig::new(&dir.path().join("system"), bins());
    cfg.tls = Some(tls.clone());
    cfg.nats = twopc_launcher::Nats::Cluster {
        nodes: 3,
        port: None,
    };
    cfg.coordinators = 2;
    cfg.coordinator.reply_after = Some(ReplyAfter::Delivery);
    let sys = System::start(cfg).await.unwrap();
    seed_alice(&sys).await;
    let cluster = sys.cluster.as_ref().unwrap();
    for node in &cluster.nodes {
        let url = format!("{}/varz", node.monitor_url());
        let (_, body) = twopc_launcher::http_get(&url, Duration::from_secs(2))
            .await
            .unwrap();
        let varz: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(varz["tls_required"], true, "{varz}");
        assert_eq!(varz["cluster"]["tls_required"], true, "{}", varz["cluster"]);
        assert_eq!(varz["cluster"]["tls_verify"], true, "{}", varz["cluster"]);
    }
    let reply: Reply<PurchaseReply> = request(
        &sys.shop.client,
        &sys.shop.purchase_subject(),
        &PurchaseRequest {
            user: "alice".into(),
            sku: "book-1".into(),
            qty: 1,
            amount: 1_250,
            request_id: None,
        },
        Duration::from_secs(15),
    )
    .await
    .unwrap();
    assert!(
        matches!(&reply, Reply::Ok(r) if r.outcome == Outcome::Committed),
        "{reply:?}"
    );
    sys.stop(Duration::from_secs(5)).await.unwrap();
}

#[test]
fn twopc_up_with_tls_makes_the_files_and_says_how_to_connect() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(why) = openssl_available() {
        eprintln!("SKIPPED: twopc up --tls needs openssl to make a test CA: {why}");
        return;
    }
    let tls_dir = dir.path().join("tls");
    let port = twopc_launcher::free_port().unwrap();
    let mut up = Command::new(env!("CARGO_BIN_EXE_twopc"))
        .args(["up", "--no-demo", "--port", &port.to_string()])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--tls")
        .arg(&tls_dir)
        .env_remove("NATS_URL")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = vec![];
    // Kept open until twopc up exits: it prints "stopping" on SIGTERM.
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.contains("Ctrl-C stops everything");
        seen.push(line);
        if done {
            break;
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("Ctrl-C stops everything")),
        "twopc up never came up: {seen:#?}"
    );
    // The script's files, keys readable by their owner only.
    let tls = TlsFiles::in_dir(&tls_dir.canonicalize().unwrap());
    tls.check().unwrap();
    for key in [
        &tls.server_key,
        &tls.client_key,
        &tls_dir.join("ca-key.pem"),
    ] {
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(key).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    // It tells how to connect with the nats CLI.
    let flags = format!(
        "--tlsca {} --tlscert {} --tlskey {}",
        tls.ca.display(),
        tls.client_cert.display(),
        tls.client_key.display()
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("nats --server") && l.contains(&flags)),
        "{flags} in {seen:#?}"
    );
    // And the CLI, told the same through the variables, creates a user.
    let out = Command::new(env!("CARGO_BIN_EXE_twopc"))
        .args(["create-user", "erin", "--balance", "5"])
        .env("NATS_URL", format!("nats://127.0.0.1:{port}"))
        .env("TWOPC_CREDS_DIR", dir.path().join("data/creds"))
        .env("NATS_CA", &tls.ca)
        .env("NATS_CERT", &tls.client_cert)
        .env("NATS_KEY", &tls.client_key)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    twopc_launcher::signal(up.id(), libc::SIGTERM).unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = up.wait().unwrap();
    assert!(
        status.success(),
        "twopc up exits cleanly: {status:?} {rest:?}"
    );
}
