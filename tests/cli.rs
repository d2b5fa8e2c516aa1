//! The `twopc` CLI as a user runs it: `twopc up` from nothing, then
//! purchases and queries through the CLI.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use twopc_launcher::{free_port, signal};

const SIGTERM: i32 = 15;

/// Runs the CLI against `url` with the credentials in `creds` (`twopc up`'s
/// `<data>/creds`).
fn twopc(url: &str, creds: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twopc"))
        .args(args)
        .env("NATS_URL", url)
        .env("TWOPC_CREDS_DIR", creds)
        .output()
        .expect("run twopc");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn twopc_up_starts_everything_and_the_cli_buys() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let mut up = Command::new(env!("CARGO_BIN_EXE_twopc"))
        .args([
            "up",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--port",
            &port.to_string(),
        ])
        .env_remove("NATS_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = vec![];
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("twopc up prints");
        seen.push(line.clone());
        if line.contains("twopc is up") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "twopc up never came up: {seen:#?}"
        );
    }
    let url = format!("nats://127.0.0.1:{port}");
    // The credentials twopc up made, and told us about.
    let creds = dir.path().canonicalize().unwrap().join("creds");
    assert!(
        seen.iter()
            .any(|l| l.contains(&creds.display().to_string())),
        "twopc up names the shop credentials: {seen:#?}"
    );
    for seed in [
        "web.nk",
        "admin.nk",
        "coordinator.nk",
        "wallet.nk",
        "order.nk",
    ] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(creds.join(seed)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{seed} is readable by its owner only");
    }
    // Without credentials the server refuses the CLI.
    let nowhere = dir.path().join("no-creds");
    let (ok, _, err) = twopc(&url, &nowhere, &["balance", "alice"]);
    assert!(!ok && err.contains("authorization violation"), "{err}");

    let (ok, out, err) = twopc(
        &url,
        &creds,
        &[
            "purchase", "--user", "alice", "--sku", "book-1", "--qty", "2",
        ],
    );
    assert!(ok, "{out}{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["outcome"], "committed", "{out}");
    let tx = reply["tx"].as_str().unwrap().to_owned();

    let (ok, out, _) = twopc(&url, &creds, &["balance", "alice"]);
    assert!(ok);
    let b: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(b["balance"], 10_000 - 2_500);

    let (ok, out, _) = twopc(&url, &creds, &["stock", "book-1"]);
    assert!(ok);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["stock"], 8);

    let (ok, out, _) = twopc(&url, &creds, &["tx", &tx]);
    assert!(ok);
    let story: serde_json::Value = serde_json::from_str(&out).unwrap();
    for part in ["coordinator", "wallet", "order"] {
        assert_eq!(story[part]["state"], "committed", "{part}: {out}");
    }

    // Any transaction, through the client library; its story names the
    // participants of its branches.
    let one = r#"{"branches":[{"participant":"wallet","op":{"user":"alice","amount":100}}],"request_id":"cli-t"}"#;
    let (ok, out, err) = twopc(&url, &creds, &["transaction", one]);
    assert!(ok, "{out}{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["outcome"], "committed", "{out}");
    let (ok, out, _) = twopc(&url, &creds, &["tx", reply["tx"].as_str().unwrap()]);
    assert!(ok);
    let story: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(story["wallet"]["state"], "committed", "{out}");
    assert!(story.get("order").is_none(), "{out}");
    let (ok, out, _) = twopc(&url, &creds, &["transaction", r#"{"branches":[]}"#]);
    assert!(!ok, "{out}");

    // Accounts from a seed file, then a refusal shown as an aborted reply.
    let seed = dir.path().join("seed.json");
    std::fs::write(&seed, r#"{"users":[{"user":"zed","balance":100}],"products":[{"sku":"mug-1","price":300,"stock":5}]}"#).unwrap();
    let (ok, out, err) = twopc(&url, &creds, &["seed", seed.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = twopc(
        &url,
        &creds,
        &["purchase", "--user", "zed", "--sku", "mug-1"],
    );
    assert!(ok);
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["outcome"], "aborted");
    assert_eq!(reply["reason"]["code"], "insufficient_funds");

    // An error reply makes the CLI fail with the code.
    let (ok, _, err) = twopc(&url, &creds, &["balance", "nobody"]);
    assert!(!ok);
    assert!(err.contains("unknown_user"), "{err}");

    signal(up.id(), SIGTERM).unwrap();
    let status = up.wait().unwrap();
    assert!(
        status.success(),
        "twopc up exits cleanly on SIGTERM: {status:?}"
    );
}

/// `twopc bench` runs and reports (a benchmark is not a test: this checks
/// that it works, not how fast anything is).
#[test]
fn twopc_bench_runs_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_twopc"))
        .args([
            "bench",
            "--start",
            "--concurrency",
            "1,4",
            "--duration",
            "2s",
            "--baseline-duration",
            "1s",
            "--abort-share",
            "0.25",
            "--json",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        r["disk_baseline"]["commits_per_s"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    assert!(r["latency_floor_us"].as_u64().unwrap() > 0, "{r}");
    let runs = r["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        let load = &run["load"];
        assert!(load["committed"].as_u64().unwrap() > 0, "{run}");
        assert!(
            load["aborted"].as_u64().unwrap() > 0,
            "the abort share aborts: {run}"
        );
        assert!(load["latency"]["p50_us"].as_u64().unwrap() > 0, "{run}");
        assert!(
            run["nats_baseline"]["requests_per_s"].as_f64().unwrap() > 0.0,
            "{run}"
        );
        assert!(run["throughput_ratio"].as_f64().unwrap() > 0.0, "{run}");
        for service in ["coordinator", "wallet", "order"] {
            assert!(run["rss_kib"][service].as_u64().unwrap() > 0, "{run}");
        }
    }
}

/// `twopc up` refuses a cluster or replica count it cannot run, before it
/// starts anything, and says why.
#[test]
fn twopc_up_refuses_bad_cluster_and_replica_counts() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let up = |args: &[&str], nats_url: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twopc"));
        cmd.args(["up", "--data-dir", data_dir, "--no-demo"])
            .args(args)
            .env_remove("NATS_URL");
        if let Some(url) = nats_url {
            cmd.env("NATS_URL", url);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for n in ["1", "2", "4", "7"] {
        let (ok, err) = up(&["--cluster", n], None);
        assert!(!ok);
        assert!(
            err.contains(&format!("a cluster of {n} nats-servers")),
            "{err}"
        );
    }
    let (ok, err) = up(&["--coordinators", "2"], None);
    assert!(!ok);
    assert!(err.contains("shared decision log"), "{err}");
    let (ok, err) = up(&["--cluster", "3"], Some("nats://127.0.0.1:1"));
    assert!(!ok);
    assert!(err.contains("NATS_URL is set"), "{err}");
    assert!(
        !dir.path().join("nats").exists() && !dir.path().join("coordinator").exists(),
        "nothing started"
    );
}

/// `twopc bench --cluster 3` measures both systems in one run and reports
/// the ratios and a computed verdict for each target (not how fast
/// anything is: any verdict passes).
#[test]
fn twopc_bench_compares_the_cluster_with_one_node() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_twopc"))
        .args([
            "bench",
            "--cluster",
            "3",
            "--concurrency",
            "1,4",
            "--duration",
            "1s",
            "--baseline-duration",
            "1s",
            "--kv-concurrency",
            "4",
            "--failover",
            "follower",
            "--failover-down",
            "1s",
            "--json",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for system in ["single", "cluster"] {
        let runs = r[system]["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "{r}");
        for run in runs {
            assert!(run["load"]["committed"].as_u64().unwrap() > 0, "{run}");
        }
    }
    assert!(
        r["single"]["disk_baseline"]["latency"]["p50_us"]
            .as_u64()
            .unwrap()
            > 0
    );
    for kv in ["kv_create_c1", "kv_create"] {
        let b = &r["cluster"][kv];
        assert!(b["creates_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(b["replicas"], 3, "{r}");
        assert_eq!(b["errors"], 0, "{r}");
    }
    assert!(
        r["cluster"]["runs"][0]["rss_kib"]["coordinator-2"]
            .as_u64()
            .unwrap()
            > 0,
        "both coordinator replicas run: {r}"
    );
    let failover = &r["cluster"]["failover"][0];
    assert_eq!(failover["target"], "follower", "{r}");
    assert!(failover["gaps"]["commits"].as_u64().unwrap() > 0, "{r}");
    assert!(
        failover["killed_at_ms"].as_u64().unwrap() < failover["restarted_at_ms"].as_u64().unwrap()
    );
    assert_eq!(r["cluster_over_single"].as_array().unwrap().len(), 2);
    let targets = r["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 3);
    assert_eq!(
        targets[0]["verdict"], "not_measured",
        "no run at concurrency 256: {r}"
    );
    for t in &targets[1..] {
        assert!(
            ["met", "not_met", "inconclusive"].contains(&t["verdict"].as_str().unwrap()),
            "computed: {t}"
        );
    }
}
