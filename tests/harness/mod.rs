//! End-to-end test harness: a real `nats-server` and the three real
//! service binaries per test, each in its own temporary folder, with SQLite
//! files the tests read directly. Processes are killed, stopped and
//! restarted with real signals.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use twopc_launcher::auth::Credentials;
use twopc_launcher::client::{request, request_raw, Reply, Shop};
use twopc_launcher::{
    self as launcher, Binaries, CoordinatorSettings, Kind, NatsServer, ParticipantSettings,
    ReplyAfter, Service, SystemConfig,
};
use twopc_schemas::api::{
    Balance, CreateProduct, CreateUser, Outcome, PurchaseReply, PurchaseRequest, Stock,
};
use twopc_schemas::subjects;
use twopc_verify::check::{self, Initial, KeyReply, Snapshot, Told};

/// The default shop client's purchase subject, `shop.web.purchase`.
pub static PURCHASE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    subjects::purchase(
        &twopc_schemas::ClientName::new(twopc_schemas::client::DEFAULT_CLIENT).expect("valid"),
    )
});

pub fn bins() -> Binaries {
    Binaries {
        coordinator: env!("CARGO_BIN_EXE_twopc-coordinator").into(),
        wallet: env!("CARGO_BIN_EXE_twopc-wallet").into(),
        order: env!("CARGO_BIN_EXE_twopc-order").into(),
    }
}

/// Per-service settings for a test system.
#[derive(Debug, Clone)]
pub struct Options {
    pub coordinator: CoordinatorSettings,
    pub wallet: ParticipantSettings,
    pub order: ParticipantSettings,
    /// Shop clients to make identities for (empty: the default one).
    pub clients: Vec<&'static str>,
    /// Participant identities beyond wallet and order (no service runs
    /// them: a test sends as them).
    pub more_participants: Vec<&'static str>,
}

impl Default for Options {
    /// Short timeouts so that fault tests finish quickly.
    fn default() -> Self {
        let participant = ParticipantSettings {
            in_doubt_after_ms: Some(3_000),
            recovery_interval_ms: Some(200),
            decision_timeout_ms: Some(1_000),
            ..Default::default()
        };
        Options {
            coordinator: CoordinatorSettings {
                prepare_timeout_ms: Some(2_000),
                decide_timeout_ms: Some(1_000),
                retry_base_ms: Some(20),
                retry_cap_ms: Some(500),
                // Tests read balances right after a reply: answer after the
                // first delivery round. (`decision`, the default, has its own
                // test.)
                reply_after: Some(ReplyAfter::Delivery),
                ..Default::default()
            },
            wallet: participant.clone(),
            order: participant,
            clients: vec![],
            more_participants: vec![],
        }
    }
}

impl Options {
    /// Sets one environment variable of one service (fault injection, or a
    /// setting a test names directly); it overrides the typed settings.
    pub fn set(mut self, kind: Kind, key: &str, value: &str) -> Self {
        let env = match kind {
            Kind::Coordinator => &mut self.coordinator.extra_env,
            Kind::Wallet => &mut self.wallet.extra_env,
            Kind::Order => &mut self.order.extra_env,
        };
        env.retain(|(k, _)| k != key);
        env.push((key.into(), value.into()));
        self
    }
}

/// A running system.
pub struct System {
    pub dir: tempfile::TempDir,
    pub nats: NatsServer,
    pub services: BTreeMap<&'static str, Service>,
    /// The admin identity's connection (creates, reads everything).
    pub client: async_nats::Client,
    /// The default shop client: it buys.
    pub shop: Shop,
    /// Every identity's credentials.
    pub creds: Credentials,
    /// Connections with the coordinator's and each participant's
    /// identities, for tests that forge protocol messages past the server's
    /// permissions (what a compromised service could send).
    pub as_coordinator: async_nats::Client,
    pub as_participant: BTreeMap<String, async_nats::Client>,
    pub initial: Initial,
}

/// Users with opening balances.
pub type Users = Vec<(&'static str, u64)>;
/// Products with price and stock.
pub type Products = Vec<(&'static str, u64, u64)>;

/// The user and product set most tests use.
pub fn standard_seed() -> (Users, Products) {
    (
        vec![("alice", 10_000), ("bob", 5_000), ("carol", 500)],
        vec![
            ("book-1", 1_250, 10),
            ("pen-1", 199, 100),
            ("lamp-1", 4_500, 2),
        ],
    )
}

impl System {
    pub async fn start(opts: Options) -> anyhow::Result<System> {
        let dir = tempfile::Builder::new().prefix("twopc-test-").tempdir()?;
        let mut cfg = SystemConfig::new(dir.path(), bins());
        cfg.client_name = "twopc-test".into();
        cfg.coordinator = opts.coordinator;
        cfg.wallet = opts.wallet;
        cfg.order = opts.order;
        cfg.more_participants = opts
            .more_participants
            .iter()
            .map(|p| twopc_schemas::ParticipantName::new(*p).expect("participant name"))
            .collect();
        let participant_names: Vec<String> = ["wallet", "order"]
            .iter()
            .chain(opts.more_participants.iter())
            .map(|p| p.to_string())
            .collect();
        if !opts.clients.is_empty() {
            cfg.clients = opts
                .clients
                .iter()
                .map(|c| twopc_schemas::ClientName::new(*c).expect("client name"))
                .collect();
        }
        let launcher::System {
            nats,
            services,
            client,
            shop,
            creds,
            ..
        } = launcher::System::start(cfg).await?;
        let creds = creds.expect("test systems run with credentials");
        let url = nats.as_ref().expect("own nats-server").url();
        let connect = |name: String| {
            let auth = creds.auth(&name);
            let url = url.clone();
            async move {
                twopc_common::nats::connect_with(
                    &url,
                    &twopc_common::nats::ConnectSettings::fail_fast(&format!("test-{name}"))
                        .with_auth(&auth),
                )
                .await
            }
        };
        let as_coordinator = connect("coordinator".into()).await?;
        let mut as_participant = BTreeMap::new();
        for p in participant_names {
            as_participant.insert(p.clone(), connect(p).await?);
        }
        Ok(System {
            dir,
            nats: nats.expect("the test system starts its own nats-server"),
            services,
            client,
            shop,
            creds,
            as_coordinator,
            as_participant,
            initial: Initial::default(),
        })
    }

    /// A new connection as identity `name` (`admin`, `coordinator`,
    /// `wallet`, `order`, `web`), with its own inbox prefix.
    pub async fn connect_as(&self, name: &str) -> async_nats::Client {
        twopc_common::nats::connect_with(
            &self.nats.url(),
            &twopc_common::nats::ConnectSettings::fail_fast(&format!("test-{name}"))
                .with_auth(&self.creds.auth(name)),
        )
        .await
        .unwrap_or_else(|e| panic!("connect as {name}: {e:#}"))
    }

    /// A connection with no credentials at all.
    pub async fn connect_anonymous(&self) -> anyhow::Result<async_nats::Client> {
        twopc_common::nats::connect_with(
            &self.nats.url(),
            &twopc_common::nats::ConnectSettings::fail_fast("test-anonymous"),
        )
        .await
    }

    pub fn service(&mut self, kind: Kind) -> &mut Service {
        self.services.get_mut(kind.name()).expect("service exists")
    }

    pub async fn wait_ready(&mut self, kind: Kind) -> anyhow::Result<()> {
        let client = self.client.clone();
        self.service(kind)
            .wait_ready(&client, Duration::from_secs(30))
            .await
    }

    /// SIGKILL then start again with the same settings, and wait until ready.
    pub async fn restart(&mut self, kind: Kind) -> anyhow::Result<()> {
        tracing_line(&format!("--- kill and restart {}", kind.name()));
        let s = self.service(kind);
        s.proc.kill()?;
        s.proc.start()?;
        self.wait_ready(kind).await
    }

    /// Starts a service that died at its crash point again, disarmed.
    pub async fn start_without_crash_points(&mut self, kind: Kind) -> anyhow::Result<()> {
        tracing_line(&format!(
            "--- start {} again without the crash point",
            kind.name()
        ));
        let s = self.service(kind);
        s.proc.set_env("TWOPC_CRASH_AT", None);
        s.proc.start()?;
        self.wait_ready(kind).await
    }

    /// Creates users and products through the typed create requests and
    /// records them as the initial state.
    pub async fn seed(
        &mut self,
        users: &[(&str, u64)],
        products: &[(&str, u64, u64)],
    ) -> anyhow::Result<()> {
        let users: Vec<CreateUser> = users
            .iter()
            .map(|(user, balance)| CreateUser {
                user: user.to_string(),
                balance: *balance,
            })
            .collect();
        let products: Vec<CreateProduct> = products
            .iter()
            .map(|(sku, price, stock)| CreateProduct {
                sku: sku.to_string(),
                price: *price,
                stock: *stock,
            })
            .collect();
        launcher::seed(&self.client, &users, &products, false).await?;
        for u in users {
            self.initial.balances.insert(u.user, u.balance);
        }
        for p in products {
            self.initial.products.insert(p.sku, (p.price, p.stock));
        }
        Ok(())
    }

    pub async fn seed_standard(&mut self) -> anyhow::Result<()> {
        let (u, p) = standard_seed();
        self.seed(&u, &p).await
    }

    /// A purchase; `Err` means no reply in time (unknown outcome).
    pub async fn purchase_with(
        &self,
        req: &PurchaseRequest,
        timeout: Duration,
    ) -> anyhow::Result<Reply<PurchaseReply>> {
        request(
            &self.shop.client,
            &self.shop.purchase_subject(),
            req,
            timeout,
        )
        .await
    }

    /// A purchase that must get a purchase reply (not an error reply).
    pub async fn purchase(&self, user: &str, sku: &str, qty: u64, amount: u64) -> PurchaseReply {
        let req = PurchaseRequest {
            user: user.into(),
            sku: sku.into(),
            qty,
            amount,
            request_id: None,
        };
        match self.purchase_with(&req, Duration::from_secs(15)).await {
            Ok(Reply::Ok(r)) => r,
            other => panic!("purchase {req:?}: {other:?}"),
        }
    }

    /// The connection that may publish to `subject`: the shop client its
    /// own `shop.<client>.*` subjects, the wallet decision queries, the
    /// coordinator the rest of `twopc.>`, admin everything else.
    pub fn client_for(&self, subject: &str) -> &async_nats::Client {
        let own = format!("shop.{}.", self.shop.name);
        if subject.starts_with(&own) {
            &self.shop.client
        } else if let Some(p) = subject.strip_prefix("twopc.decision.") {
            self.as_participant.get(p).unwrap_or(&self.client)
        } else if subject.starts_with("twopc.") {
            &self.as_coordinator
        } else {
            &self.client
        }
    }

    pub async fn raw(&self, subject: &str, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        request_raw(
            self.client_for(subject),
            subject,
            payload.to_vec(),
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn balance(&self, user: &str) -> Balance {
        let r = request(
            &self.client,
            subjects::WALLET_BALANCE,
            &serde_json::json!({ "user": user }),
            Duration::from_secs(5),
        )
        .await;
        match r {
            Ok(Reply::Ok(b)) => b,
            other => panic!("balance {user}: {other:?}"),
        }
    }

    pub async fn stock(&self, sku: &str) -> Stock {
        let r = request(
            &self.client,
            subjects::ORDER_STOCK,
            &serde_json::json!({ "sku": sku }),
            Duration::from_secs(5),
        )
        .await;
        match r {
            Ok(Reply::Ok(s)) => s,
            other => panic!("stock {sku}: {other:?}"),
        }
    }

    /// A participant's or the coordinator's JSON view of a transaction.
    pub async fn tx_status(&self, subject: &str, tx: &str) -> serde_json::Value {
        let raw = self
            .raw(
                subject,
                serde_json::json!({ "tx": tx }).to_string().as_bytes(),
            )
            .await
            .expect("status reply");
        serde_json::from_slice(&raw).expect("status is JSON")
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot::read(self.dir.path()).expect("databases readable")
    }

    /// Waits (bounded) until nothing is in flight anywhere.
    pub async fn wait_quiescent(&self, timeout: Duration) -> anyhow::Result<Snapshot> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.snapshot();
            if s.quiescent() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "not quiescent after {timeout:?}: {:?}",
                    check::no_holds_left(&s)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for quiescence and asserts every invariant.
    pub async fn assert_consistent(&self, told: &[Told]) -> Snapshot {
        self.assert_consistent_keys(told, &[]).await
    }

    /// Waits for quiescence and asserts every invariant, including the
    /// client view per `request_id` over `replies`.
    pub async fn assert_consistent_keys(&self, told: &[Told], replies: &[KeyReply]) -> Snapshot {
        let s = self
            .wait_quiescent(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.logs()));
        let violations = check::all(&self.initial, told, replies, &s);
        assert!(
            violations.is_empty(),
            "invariants violated:\n{}",
            violations.join("\n")
        );
        s
    }

    /// All service logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, s) in &self.services {
            let log = s.proc.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            out.push_str(&format!("===== {name} (last 40 lines)\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// A second instance of participant `kind` (not started): the same
    /// command line and credentials, data folder `data_dir`, log
    /// `<dir>/<name>.log`.
    pub fn duplicate(
        &mut self,
        kind: Kind,
        name: &str,
        data_dir: &std::path::Path,
    ) -> launcher::Proc {
        let log = self.dir.path().join(format!("{name}.log"));
        let mut p = self.service(kind).proc.duplicate(name, log);
        p.set_env("TWOPC_DATA_DIR", Some(&data_dir.display().to_string()));
        p
    }

    /// The data folder of service `name`.
    pub fn data_dir(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Waits until the service's log contains one of `needles`.
    pub async fn wait_log_any(
        &mut self,
        kind: Kind,
        needles: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.service(kind).proc.log();
            if needles.iter().any(|n| log.contains(n)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} log never said any of {needles:?}:\n{log}", kind.name());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// What a purchase reply told the client, for the client-view invariant.
pub fn told(r: &anyhow::Result<Reply<PurchaseReply>>) -> Told {
    match r {
        Ok(Reply::Ok(p)) => {
            let tx = p.tx.parse().expect("tx id");
            match p.outcome {
                Outcome::Committed => Told::Committed(tx),
                Outcome::Aborted => Told::Aborted(tx),
            }
        }
        _ => Told::Unknown,
    }
}

/// Narrates a scenario step in the test output.
pub fn tracing_line(s: &str) {
    eprintln!("{s}");
}

pub fn tx_id(r: &PurchaseReply) -> uuid::Uuid {
    r.tx.parse().context("tx id").unwrap()
}

/// How often [`poll_until`] asks again.
pub const POLL_INTERVAL_MS: u64 = 25;

/// Asks `probe` until it returns `Ok`, for at most `timeout`, and returns
/// that value; panics naming `what` and the last `Err` (what `probe` saw)
/// if it never does. Tests wait on the system's own state with this,
/// never on a fixed sleep.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: std::time::Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(last) => last,
        };
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
}
