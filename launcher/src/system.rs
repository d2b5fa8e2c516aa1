//! The one way to start a twopc system: [`System::start`] with a
//! [`SystemConfig`] of typed per-service settings, turned into the
//! services' environment in one place ([`CoordinatorSettings::env`],
//! [`ParticipantSettings::env`]), with asynchronous readiness waits.
//! `twopc up`, `twopc bench --start`, `twopc chaos` and the test harness all
//! start their systems here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use twopc_schemas::api::{CreateProduct, CreateUser};
use twopc_schemas::{participant, subjects, Code, ParticipantName};

use crate::client::{request, Reply};
use crate::process::{Binaries, NatsServer, Proc};

/// Which service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Coordinator,
    Wallet,
    Order,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Coordinator, Kind::Wallet, Kind::Order];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Coordinator => "coordinator",
            Kind::Wallet => "wallet",
            Kind::Order => "order",
        }
    }

    /// The participant this service is, if it is one.
    pub fn participant(self) -> Option<ParticipantName> {
        match self {
            Kind::Coordinator => None,
            Kind::Wallet => Some(participant::WALLET),
            Kind::Order => Some(participant::ORDER),
        }
    }

    /// Whether the service answers its probe subject now (within 500 ms):
    /// it is serving.
    pub async fn answers(self, client: &async_nats::Client) -> bool {
        let (subject, body) = self.probe();
        let req = async_nats::Request::new()
            .payload(body.to_vec().into())
            .timeout(Some(Duration::from_millis(500)));
        client.send_request(subject, req).await.is_ok()
    }

    /// A public subject the service answers once it is serving, with the
    /// request that elicits a (harmless) error reply.
    fn probe(self) -> (&'static str, &'static [u8]) {
        match self {
            Kind::Coordinator => (subjects::TX_STATUS, b"{}"),
            Kind::Wallet => (subjects::WALLET_BALANCE, b"{}"),
            Kind::Order => (subjects::ORDER_STOCK, b"{}"),
        }
    }
}

/// When the coordinator answers a purchase (`TWOPC_REPLY_AFTER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyAfter {
    /// As soon as the decision is durable (the service's default).
    Decision,
    /// After the first delivery round.
    Delivery,
}

/// The coordinator's settings; `None` leaves the service's default.
#[derive(Debug, Clone, Default)]
pub struct CoordinatorSettings {
    /// How long to wait for each participant's vote.
    pub prepare_timeout_ms: Option<u64>,
    /// How long to wait for each participant's acknowledgement.
    pub decide_timeout_ms: Option<u64>,
    /// First and largest delay between deliveries of a decision.
    pub retry_base_ms: Option<u64>,
    pub retry_cap_ms: Option<u64>,
    pub reply_after: Option<ReplyAfter>,
    /// Purchases in flight at once (past it: `busy`).
    pub max_in_flight: Option<u64>,
    /// More environment, applied last (so it overrides the above): fault
    /// injection (`TWOPC_CRASH_AT`, `TWOPC_DELAY`, `TWOPC_BREAK`, ...).
    pub extra_env: Vec<(String, String)>,
}

impl CoordinatorSettings {
    /// The service's environment for these settings: the one place where
    /// typed settings become the variables the binary reads.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![];
        put(
            &mut env,
            "TWOPC_PREPARE_TIMEOUT_MS",
            self.prepare_timeout_ms,
        );
        put(&mut env, "TWOPC_DECIDE_TIMEOUT_MS", self.decide_timeout_ms);
        put(&mut env, "TWOPC_RETRY_BASE_MS", self.retry_base_ms);
        put(&mut env, "TWOPC_RETRY_CAP_MS", self.retry_cap_ms);
        put(&mut env, "TWOPC_MAX_INFLIGHT", self.max_in_flight);
        let reply_after = self.reply_after.map(|r| match r {
            ReplyAfter::Decision => "decision",
            ReplyAfter::Delivery => "delivery",
        });
        put(&mut env, "TWOPC_REPLY_AFTER", reply_after);
        overlay(&mut env, &self.extra_env);
        env
    }
}

/// A participant's (wallet's or order service's) settings; `None` leaves
/// the service's default.
#[derive(Debug, Clone, Default)]
pub struct ParticipantSettings {
    /// How long a prepared branch waits for its decision before the
    /// participant asks the coordinator (it is then in doubt).
    pub in_doubt_after_ms: Option<u64>,
    /// How often the in-doubt recovery runs.
    pub recovery_interval_ms: Option<u64>,
    /// How long one decision query waits for its answer.
    pub decision_timeout_ms: Option<u64>,
    /// Handlers in flight per subject (past it: `busy`).
    pub max_in_flight: Option<u64>,
    /// More environment, applied last (so it overrides the above).
    pub extra_env: Vec<(String, String)>,
}

impl ParticipantSettings {
    /// The service's environment for these settings.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![];
        put(&mut env, "TWOPC_IN_DOUBT_AFTER_MS", self.in_doubt_after_ms);
        put(
            &mut env,
            "TWOPC_RECOVERY_INTERVAL_MS",
            self.recovery_interval_ms,
        );
        put(
            &mut env,
            "TWOPC_DECISION_TIMEOUT_MS",
            self.decision_timeout_ms,
        );
        put(&mut env, "TWOPC_MAX_INFLIGHT", self.max_in_flight);
        overlay(&mut env, &self.extra_env);
        env
    }
}

fn put(env: &mut Vec<(String, String)>, key: &str, value: Option<impl ToString>) {
    if let Some(v) = value {
        env.push((key.to_owned(), v.to_string()));
    }
}

/// Sets each of `extra` in `env`, replacing a variable already there.
fn overlay(env: &mut Vec<(String, String)>, extra: &[(String, String)]) {
    for (key, value) in extra {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
}

/// Which NATS the system uses.
#[derive(Debug, Clone)]
pub enum Nats {
    /// Start a `nats-server` on this loopback port (a free one if `None`).
    Start { port: Option<u16> },
    /// Use a server that runs already.
    Use { url: String },
}

/// Everything needed to start a system.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// Data folder: `nats/`, one folder per service, and the log files.
    pub root: PathBuf,
    pub nats: Nats,
    pub binaries: Binaries,
    /// `RUST_LOG` of every service.
    pub log_level: String,
    pub coordinator: CoordinatorSettings,
    pub wallet: ParticipantSettings,
    pub order: ParticipantSettings,
    /// A service that connects elsewhere than the system's NATS URL (the
    /// chaos runner routes each through a proxy it can cut).
    pub nats_url_of: BTreeMap<Kind, String>,
    /// Most time a service may take to start answering.
    pub ready_timeout: Duration,
    /// The name of the system's own NATS client.
    pub client_name: String,
}

impl SystemConfig {
    /// A system in `root` with its own nats-server, the services' default
    /// settings and log level `info`.
    pub fn new(root: &Path, binaries: Binaries) -> Self {
        SystemConfig {
            root: root.to_owned(),
            nats: Nats::Start { port: None },
            binaries,
            log_level: "info".into(),
            coordinator: CoordinatorSettings::default(),
            wallet: ParticipantSettings::default(),
            order: ParticipantSettings::default(),
            nats_url_of: BTreeMap::new(),
            ready_timeout: Duration::from_secs(30),
            client_name: "twopc-launcher".into(),
        }
    }

    /// The environment of one service, beyond its NATS URL and data folder.
    pub fn env_of(&self, kind: Kind) -> Vec<(String, String)> {
        let mut env = vec![("RUST_LOG".to_owned(), self.log_level.clone())];
        let settings = match kind {
            Kind::Coordinator => self.coordinator.env(),
            Kind::Wallet => self.wallet.env(),
            Kind::Order => self.order.env(),
        };
        overlay(&mut env, &settings);
        env
    }
}

/// One service process with its own data folder.
pub struct Service {
    pub kind: Kind,
    pub proc: Proc,
}

impl Service {
    fn new(
        kind: Kind,
        bins: &Binaries,
        root: &Path,
        nats_url: &str,
        env_extra: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let data = root.join(kind.name());
        std::fs::create_dir_all(&data)?;
        let program = match kind {
            Kind::Coordinator => &bins.coordinator,
            Kind::Wallet => &bins.wallet,
            Kind::Order => &bins.order,
        };
        let mut env = vec![
            ("NATS_URL".to_owned(), nats_url.to_owned()),
            ("TWOPC_DATA_DIR".to_owned(), data.display().to_string()),
        ];
        overlay(&mut env, &env_extra);
        let proc = Proc::new(
            kind.name(),
            program,
            vec![],
            env,
            root.join(format!("{}.log", kind.name())),
        );
        Ok(Service { kind, proc })
    }

    /// Waits until the service answers its probe subject.
    pub async fn wait_ready(
        &mut self,
        client: &async_nats::Client,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.kind.answers(client).await {
                return Ok(());
            }
            if !self.proc.is_running() {
                bail!(
                    "{} exited during start; log:\n{}",
                    self.kind.name(),
                    self.proc.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {timeout:?}; log:\n{}",
                    self.kind.name(),
                    self.proc.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A running system: nats-server (when started here), the three services
/// and a NATS client. Dropping it kills every process.
pub struct System {
    /// The nats-server started here (`None` with [`Nats::Use`]).
    pub nats: Option<NatsServer>,
    pub url: String,
    pub root: PathBuf,
    pub services: BTreeMap<&'static str, Service>,
    pub client: async_nats::Client,
    pub ready_timeout: Duration,
}

impl System {
    /// Starts nats-server (unless told to use one), then the services, and
    /// waits until each answers.
    pub async fn start(cfg: SystemConfig) -> anyhow::Result<System> {
        std::fs::create_dir_all(&cfg.root)?;
        let (nats, url) = match &cfg.nats {
            Nats::Start { port } => {
                let s = NatsServer::start(&cfg.root.join("nats"), *port)
                    .await
                    .context("starting nats-server")?;
                let url = s.url();
                (Some(s), url)
            }
            Nats::Use { url } => (None, url.clone()),
        };
        let client = twopc_common::nats::connect(&url, &cfg.client_name).await?;
        let mut services = BTreeMap::new();
        for kind in Kind::ALL {
            let service_url = cfg.nats_url_of.get(&kind).unwrap_or(&url);
            let mut s = Service::new(
                kind,
                &cfg.binaries,
                &cfg.root,
                service_url,
                cfg.env_of(kind),
            )?;
            s.proc.start()?;
            services.insert(kind.name(), s);
        }
        let mut sys = System {
            nats,
            url,
            root: cfg.root,
            services,
            client,
            ready_timeout: cfg.ready_timeout,
        };
        for kind in Kind::ALL {
            sys.wait_ready(kind).await?;
        }
        Ok(sys)
    }

    pub fn service(&mut self, kind: Kind) -> &mut Service {
        self.services.get_mut(kind.name()).expect("service exists")
    }

    /// The nats-server started here.
    pub fn nats_server(&mut self) -> &mut NatsServer {
        self.nats
            .as_mut()
            .expect("this system started its nats-server")
    }

    /// Waits until `kind` answers (up to the configured ready timeout).
    pub async fn wait_ready(&mut self, kind: Kind) -> anyhow::Result<()> {
        let client = self.client.clone();
        let timeout = self.ready_timeout;
        self.service(kind).wait_ready(&client, timeout).await
    }

    /// Creates users and products through the public create requests. With
    /// `exists_ok`, one that exists already counts as created (idempotent
    /// seeding); otherwise it is an error.
    pub async fn seed(
        &self,
        users: &[CreateUser],
        products: &[CreateProduct],
        exists_ok: bool,
    ) -> anyhow::Result<()> {
        seed(&self.client, users, products, exists_ok).await
    }

    /// SIGTERM every service (waiting up to `grace` each), then stop
    /// nats-server. The system's client is closed first, so that it does
    /// not report the server going away.
    pub async fn stop(self, grace: Duration) -> anyhow::Result<()> {
        let System {
            nats,
            mut services,
            client,
            ..
        } = self;
        drop(client);
        for s in services.values_mut().rev() {
            s.proc.terminate(grace).await?;
        }
        if let Some(mut n) = nats {
            n.proc.terminate(grace).await?;
        }
        Ok(())
    }
}

/// Creates users and products through the typed create requests
/// (`wallet.users.create`, `order.products.create`) on any client.
pub async fn seed(
    client: &async_nats::Client,
    users: &[CreateUser],
    products: &[CreateProduct],
    exists_ok: bool,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(10);
    for u in users {
        match request::<_, serde_json::Value>(client, subjects::WALLET_CREATE_USER, u, timeout)
            .await?
        {
            Reply::Ok(_) => {}
            Reply::Err(e) if exists_ok && e.error.code == Code::AlreadyExists => {}
            Reply::Err(e) => bail!("create user {}: {e:?}", u.user),
        }
    }
    for p in products {
        match request::<_, serde_json::Value>(client, subjects::ORDER_CREATE_PRODUCT, p, timeout)
            .await?
        {
            Reply::Ok(_) => {}
            Reply::Err(e) if exists_ok && e.error.code == Code::AlreadyExists => {}
            Reply::Err(e) => bail!("create product {}: {e:?}", p.sku),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
        let mut found = env.iter().filter(|(k, _)| k == key);
        let value = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "{key} set twice in {env:?}");
        value
    }

    #[test]
    fn typed_settings_become_the_variables_the_services_read() {
        let mut cfg =
            SystemConfig::new(Path::new("/tmp/x"), Binaries::beside_current_exe().unwrap());
        cfg.log_level = "warn".into();
        cfg.coordinator = CoordinatorSettings {
            prepare_timeout_ms: Some(500),
            max_in_flight: Some(20_000),
            reply_after: Some(ReplyAfter::Delivery),
            ..Default::default()
        };
        cfg.wallet.in_doubt_after_ms = Some(3_000);
        let c = cfg.env_of(Kind::Coordinator);
        assert_eq!(get(&c, "RUST_LOG"), Some("warn"));
        assert_eq!(get(&c, "TWOPC_PREPARE_TIMEOUT_MS"), Some("500"));
        assert_eq!(get(&c, "TWOPC_MAX_INFLIGHT"), Some("20000"));
        assert_eq!(get(&c, "TWOPC_REPLY_AFTER"), Some("delivery"));
        assert_eq!(
            get(&c, "TWOPC_DECIDE_TIMEOUT_MS"),
            None,
            "unset: the service's default"
        );
        let w = cfg.env_of(Kind::Wallet);
        assert_eq!(get(&w, "TWOPC_IN_DOUBT_AFTER_MS"), Some("3000"));
        assert_eq!(get(&w, "TWOPC_PREPARE_TIMEOUT_MS"), None);
        assert_eq!(
            get(&cfg.env_of(Kind::Order), "TWOPC_IN_DOUBT_AFTER_MS"),
            None
        );
    }

    #[test]
    fn extra_env_overrides_typed_settings_and_the_log_level() {
        let mut cfg =
            SystemConfig::new(Path::new("/tmp/x"), Binaries::beside_current_exe().unwrap());
        cfg.order = ParticipantSettings {
            decision_timeout_ms: Some(1_000),
            extra_env: vec![
                ("TWOPC_DECISION_TIMEOUT_MS".into(), "50".into()),
                ("RUST_LOG".into(), "debug".into()),
                ("TWOPC_CRASH_AT".into(), "order.decide.before_apply".into()),
            ],
            ..Default::default()
        };
        let o = cfg.env_of(Kind::Order);
        assert_eq!(get(&o, "TWOPC_DECISION_TIMEOUT_MS"), Some("50"));
        assert_eq!(get(&o, "RUST_LOG"), Some("debug"));
        assert_eq!(get(&o, "TWOPC_CRASH_AT"), Some("order.decide.before_apply"));
    }
}
