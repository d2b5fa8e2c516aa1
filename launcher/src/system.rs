//! The one way to start a twopc system: [`System::start`] with a
//! [`SystemConfig`] of typed per-service settings, turned into the
//! services' environment in one place ([`CoordinatorSettings::env`],
//! [`ParticipantSettings::env`], [`DecisionStore::env`]), with asynchronous
//! readiness waits. `twopc up`, `twopc bench --start`, `twopc chaos` and the
//! test harness all start their systems here.
//!
//! A system runs on one nats-server or on a JetStream cluster
//! ([`Nats::Cluster`]), with one coordinator or, on a cluster, several
//! replicas that share their decision log.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use twopc_schemas::api::{CreateProduct, CreateUser};
use twopc_schemas::ClientName;
use twopc_schemas::{participant, subjects, Code, ParticipantName};

use crate::auth::{self, Credentials};
use crate::client::{request, Reply, Shop};
use crate::cluster::NatsCluster;
use crate::process::{Binaries, NatsServer, Proc};
use crate::tls::TlsFiles;

/// Most coordinator replicas a system runs.
pub const MAX_COORDINATORS: usize = 5;

/// The coordinator replicas' names, in [`System::services`], as data
/// folders and log files: the first is plain `coordinator` (as with one).
const COORDINATOR_NAMES: [&str; MAX_COORDINATORS] = [
    "coordinator",
    "coordinator-2",
    "coordinator-3",
    "coordinator-4",
    "coordinator-5",
];

/// The name of coordinator replica `i` (from 0): `coordinator`,
/// `coordinator-2`, `coordinator-3`, ... Panics from [`MAX_COORDINATORS`].
pub fn coordinator_name(i: usize) -> &'static str {
    COORDINATOR_NAMES[i]
}

/// How long one count of a service's instances listens for their
/// `$SRV.PING` answers (loopback answers take about a millisecond).
const PING_WINDOW: Duration = Duration::from_millis(250);

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
    /// The services keep their own SQLite files.
    Start { port: Option<u16> },
    /// Start a JetStream cluster of `nodes` nats-servers (3 or 5) on
    /// loopback; node `i` on client port `port + i` (free ports if `None`).
    /// The coordinators keep their decisions in a KV bucket with a replica
    /// on every node ([`DecisionStore::Kv`]); the participants keep SQLite.
    Cluster { nodes: usize, port: Option<u16> },
    /// Use a server that runs already.
    Use { url: String },
}

/// Where the coordinators keep their decision log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionStore {
    /// Each coordinator's SQLite file in its data folder (the service's
    /// default: nothing is set).
    Sqlite,
    /// A JetStream KV bucket with `replicas` replicas, shared by every
    /// coordinator replica; `monitor_urls` are the servers' monitoring
    /// endpoints (their `/varz` says whether each fsyncs every write).
    Kv {
        replicas: usize,
        monitor_urls: Vec<String>,
    },
}

impl DecisionStore {
    /// The coordinator's environment for this store (`TWOPC_STORE`,
    /// `TWOPC_KV_REPLICAS`, `TWOPC_NATS_MONITOR`).
    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            DecisionStore::Sqlite => vec![],
            DecisionStore::Kv {
                replicas,
                monitor_urls,
            } => vec![
                ("TWOPC_STORE".into(), "kv".into()),
                ("TWOPC_KV_REPLICAS".into(), replicas.to_string()),
                ("TWOPC_NATS_MONITOR".into(), monitor_urls.join(",")),
            ],
        }
    }
}

/// Everything needed to start a system.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// Data folder: `nats/` (a cluster: `nats/node-<i>/`), one folder per
    /// service (`coordinator`, `coordinator-2`, ..., `wallet`, `order`),
    /// and the log files.
    pub root: PathBuf,
    pub nats: Nats,
    /// Coordinator replicas (1 to [`MAX_COORDINATORS`]); more than one needs
    /// [`Nats::Cluster`], where they share their decision log.
    pub coordinators: usize,
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
    /// On a cluster: run each node as a user of its own, so that one can be
    /// cut off from the others (`NatsCluster::isolate`).
    pub cluster_isolatable: bool,
    /// Credentials and permissions (the default): every service, the
    /// system's clients and anyone else connect with an NKey identity from
    /// `root/creds` ([`crate::auth`]), and a server started here refuses
    /// any other connection. With [`Nats::Use`] the identities are made
    /// and used, and the server's own config decides (include
    /// `creds/auth.conf` in it to enforce them). `false`: no credentials at
    /// all (a baseline, or a server of one's own without them).
    pub auth: bool,
    /// The shop clients to make identities for; the first is
    /// [`System::shop`].
    pub clients: Vec<ClientName>,
    /// Identities for participants beyond the purchase's (a service of
    /// one's own, or a test's stranger).
    pub more_participants: Vec<ParticipantName>,
    /// TLS, beside the credentials (`None`, the default: plain TCP). The
    /// server or cluster started here requires TLS of every client (and its
    /// routes use TLS too), and every service (`NATS_CA`, `NATS_CERT`,
    /// `NATS_KEY`) and the system's own clients connect with these files:
    /// they trust the CA and present the client certificate. With
    /// [`Nats::Use`] the clients do the same and the server's own config
    /// decides. The files are made by `scripts/make-ca.sh`
    /// ([`TlsFiles::make`]).
    pub tls: Option<TlsFiles>,
    /// With `tls`: a server started here also requires a client
    /// certificate signed by the CA (mutual TLS; the default).
    pub mutual_tls: bool,
}

impl SystemConfig {
    /// A system in `root` with its own nats-server, the services' default
    /// settings and log level `info`.
    pub fn new(root: &Path, binaries: Binaries) -> Self {
        SystemConfig {
            root: root.to_owned(),
            nats: Nats::Start { port: None },
            coordinators: 1,
            binaries,
            log_level: "info".into(),
            coordinator: CoordinatorSettings::default(),
            wallet: ParticipantSettings::default(),
            order: ParticipantSettings::default(),
            nats_url_of: BTreeMap::new(),
            ready_timeout: Duration::from_secs(30),
            client_name: "twopc-launcher".into(),
            cluster_isolatable: false,
            auth: true,
            clients: vec![auth::default_client()],
            more_participants: vec![],
            tls: None,
            mutual_tls: true,
        }
    }

    /// Refuses a configuration that cannot run (before anything starts):
    /// a cluster size [`NatsCluster::check_size`] refuses, no coordinator or
    /// too many, or coordinator replicas without a shared decision log.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Nats::Cluster { nodes, .. } = self.nats {
            NatsCluster::check_size(nodes)?;
        }
        let n = self.coordinators;
        if !(1..=MAX_COORDINATORS).contains(&n) {
            bail!("{n} coordinators: run from 1 to {MAX_COORDINATORS}");
        }
        if n > 1 && !matches!(self.nats, Nats::Cluster { .. }) {
            bail!(
                "{n} coordinator replicas need a shared decision log, the cluster's KV \
                 bucket (Nats::Cluster, `twopc up --cluster 3`): on SQLite each replica \
                 would keep its own log, and two logs could record different decisions \
                 for one transaction"
            );
        }
        Ok(())
    }

    /// The services to start, by name: the coordinator replicas, then the
    /// participants.
    fn services(&self) -> Vec<(&'static str, Kind)> {
        let mut out: Vec<_> = COORDINATOR_NAMES[..self.coordinators]
            .iter()
            .map(|&name| (name, Kind::Coordinator))
            .collect();
        out.push((Kind::Wallet.name(), Kind::Wallet));
        out.push((Kind::Order.name(), Kind::Order));
        out
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
    /// Its name in [`System::services`], its data folder and its log
    /// file: the kind's name, or a coordinator replica's
    /// ([`coordinator_name`]).
    pub name: &'static str,
    pub kind: Kind,
    pub proc: Proc,
}

impl Service {
    fn new(
        name: &'static str,
        kind: Kind,
        bins: &Binaries,
        root: &Path,
        nats_url: &str,
        env_extra: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let data = root.join(name);
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
        let proc = Proc::new(name, program, vec![], env, root.join(format!("{name}.log")));
        Ok(Service { name, kind, proc })
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
                    self.name,
                    self.proc.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {timeout:?}; log:\n{}",
                    self.name,
                    self.proc.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A running system: nats-server or a cluster (when started here), the
/// services and a NATS client. Dropping it kills every process.
pub struct System {
    /// The single nats-server started here (`None` with [`Nats::Use`] and
    /// [`Nats::Cluster`]).
    pub nats: Option<NatsServer>,
    /// The cluster started here ([`Nats::Cluster`]).
    pub cluster: Option<NatsCluster>,
    /// The NATS URL the services use: a cluster's nodes comma-separated.
    pub url: String,
    /// Where the coordinators keep their decisions.
    pub store: DecisionStore,
    pub root: PathBuf,
    /// The services by name: `coordinator` (and `coordinator-2`, ... with
    /// replicas), `wallet`, `order`.
    pub services: BTreeMap<&'static str, Service>,
    /// The system's admin client: creates users and products, reads
    /// everything ([`crate::auth::Role::Admin`]).
    pub client: async_nats::Client,
    /// The default shop client: it buys.
    pub shop: Shop,
    /// The identities' credentials (`None` when started without auth).
    pub creds: Option<Credentials>,
    /// The TLS files every client uses (`None`: plain TCP).
    pub tls: Option<TlsFiles>,
    pub ready_timeout: Duration,
}

impl System {
    /// Starts nats-server or a cluster (unless told to use one), then the
    /// services, and waits until each answers.
    pub async fn start(cfg: SystemConfig) -> anyhow::Result<System> {
        cfg.check()?;
        std::fs::create_dir_all(&cfg.root)?;
        let nats_dir = cfg.root.join("nats");
        if let Some(t) = &cfg.tls {
            t.check()?;
        }
        let server_tls = cfg.tls.as_ref().map(|t| t.server(cfg.mutual_tls));
        let creds = if cfg.auth {
            Some(Credentials::ensure(
                &cfg.root.join(auth::CREDS_DIR),
                &auth::roles(&cfg.clients, &cfg.more_participants),
                subjects::DECISION_BUCKET,
            )?)
        } else {
            None
        };
        let (nats, cluster, url, store) = match &cfg.nats {
            Nats::Start { port } => {
                let s = NatsServer::start_with(&nats_dir, *port, creds.clone(), server_tls.clone())
                    .await
                    .context("starting nats-server")?;
                let url = s.url();
                (Some(s), None, url, DecisionStore::Sqlite)
            }
            Nats::Cluster { nodes, port } => {
                let c = NatsCluster::start_with(
                    &nats_dir,
                    *nodes,
                    *port,
                    cfg.cluster_isolatable,
                    creds.clone(),
                    server_tls.clone(),
                )
                .await
                .context("starting the nats-server cluster")?;
                let store = DecisionStore::Kv {
                    replicas: *nodes,
                    monitor_urls: c.monitor_urls(),
                };
                let url = c.url_list();
                (None, Some(c), url, store)
            }
            Nats::Use { url } => (None, None, url.clone(), DecisionStore::Sqlite),
        };
        let shop_name = cfg
            .clients
            .first()
            .cloned()
            .context("a system needs a shop client")?;
        let auth_of = |name: &str| auth_args(creds.as_ref(), cfg.tls.as_ref(), name);
        let client = twopc_common::nats::connect(&url, &cfg.client_name, &auth_of("admin")).await?;
        let shop_client = twopc_common::nats::connect(
            &url,
            &format!("{}-shop", cfg.client_name),
            &auth_of(shop_name.as_str()),
        )
        .await?;
        let shop = Shop {
            client: shop_client,
            name: shop_name,
        };
        let mut services = BTreeMap::new();
        for (name, kind) in cfg.services() {
            let service_url = cfg.nats_url_of.get(&kind).unwrap_or(&url);
            let mut env = match kind {
                Kind::Coordinator => store.env(),
                Kind::Wallet | Kind::Order => vec![],
            };
            if let Some(c) = &creds {
                let seed = c.seed_file(kind.name());
                env.push(("NATS_NKEY".into(), seed.display().to_string()));
            }
            if let Some(t) = &cfg.tls {
                env.extend(t.env());
            }
            // The typed settings and their extra environment come last:
            // a test may override anything.
            overlay(&mut env, &cfg.env_of(kind));
            let mut s = Service::new(name, kind, &cfg.binaries, &cfg.root, service_url, env)?;
            s.proc.start()?;
            services.insert(name, s);
        }
        let mut sys = System {
            nats,
            cluster,
            url,
            store,
            root: cfg.root,
            services,
            client,
            shop,
            creds,
            tls: cfg.tls,
            ready_timeout: cfg.ready_timeout,
        };
        for kind in Kind::ALL {
            sys.wait_ready(kind).await?;
        }
        // A replica that failed at start does not keep the others from
        // answering; it still fails the start.
        for s in sys.services.values_mut() {
            if !s.proc.is_running() {
                bail!("{} exited during start; log:\n{}", s.name, s.proc.log());
            }
        }
        Ok(sys)
    }

    /// How identity `name` connects: its NKey seed (without auth, none)
    /// and, with TLS, the CA and the client certificate.
    pub fn auth_of(&self, name: &str) -> twopc_common::nats::AuthArgs {
        auth_args(self.creds.as_ref(), self.tls.as_ref(), name)
    }

    /// A new connection as identity `name` (`admin`, `coordinator`,
    /// `wallet`, `order`, `web`; see [`crate::auth`]); without auth, a plain
    /// one.
    pub async fn connect_as(&self, name: &str) -> anyhow::Result<async_nats::Client> {
        let auth = self.auth_of(name);
        twopc_common::nats::connect_with(
            &self.url,
            &twopc_common::nats::ConnectSettings::fail_fast(&format!("test-{name}"))
                .with_auth(&auth),
        )
        .await
    }

    /// The service of `kind`; for the coordinator, the first replica.
    pub fn service(&mut self, kind: Kind) -> &mut Service {
        self.services.get_mut(kind.name()).expect("service exists")
    }

    /// A second instance of participant `kind` (not started), as a user
    /// would start one: the same command line and credentials, the data
    /// folder `data_dir` (another folder, or the service's own for a
    /// rolling restart), its log `<root>/<name>.log`.
    pub fn duplicate(&mut self, kind: Kind, name: &str, data_dir: &Path) -> Proc {
        assert!(
            kind.participant().is_some(),
            "only participants have owners"
        );
        let log = self.root.join(format!("{name}.log"));
        let mut p = self.service(kind).proc.duplicate(name, log);
        p.set_env("TWOPC_DATA_DIR", Some(&data_dir.display().to_string()));
        p
    }

    /// The data folder of service `name` (`wallet`, `order`, ...).
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Coordinator replica `i` (from 0; 0 is [`System::service`]'s).
    pub fn coordinator(&mut self, i: usize) -> &mut Service {
        assert!(
            i < self.coordinator_count(),
            "coordinator replica {i} of {}",
            self.coordinator_count()
        );
        self.services
            .get_mut(coordinator_name(i))
            .expect("replica exists")
    }

    /// How many coordinator replicas the system runs.
    pub fn coordinator_count(&self) -> usize {
        self.services
            .values()
            .filter(|s| s.kind == Kind::Coordinator)
            .count()
    }

    /// The single nats-server started here.
    pub fn nats_server(&mut self) -> &mut NatsServer {
        self.nats
            .as_mut()
            .expect("this system started a single nats-server (a cluster: System::cluster)")
    }

    /// The nats-server cluster started here, if any.
    pub fn cluster(&mut self) -> Option<&mut NatsCluster> {
        self.cluster.as_mut()
    }

    /// Waits until `kind` answers (up to the configured ready timeout);
    /// for the coordinator with replicas, until every replica that runs
    /// answers `$SRV.PING.coordinator` too (its public subjects are served
    /// by whichever replica the queue group picks). A paused replica that
    /// runs never answers: this then times out.
    pub async fn wait_ready(&mut self, kind: Kind) -> anyhow::Result<()> {
        let client = self.client.clone();
        let timeout = self.ready_timeout;
        let deadline = Instant::now() + timeout;
        self.service(kind).wait_ready(&client, timeout).await?;
        let replicas: Vec<&'static str> = self
            .services
            .values()
            .filter(|s| s.kind == kind)
            .map(|s| s.name)
            .collect();
        if replicas.len() < 2 {
            return Ok(());
        }
        loop {
            let mut running = 0;
            for name in &replicas {
                let s = self.services.get_mut(name).expect("service exists");
                if s.proc.is_running() {
                    running += 1;
                }
            }
            let answering = instances(&client, kind.name(), running).await?;
            if answering >= running {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{answering} of {running} running {} replicas answer $SRV.PING after \
                     {timeout:?}",
                    kind.name()
                );
            }
        }
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
    /// nats-server or the cluster's nodes. The system's client is closed
    /// first, so that it does not report the server going away.
    pub async fn stop(self, grace: Duration) -> anyhow::Result<()> {
        let System {
            nats,
            cluster,
            mut services,
            client,
            shop,
            ..
        } = self;
        drop(client);
        drop(shop);
        for s in services.values_mut().rev() {
            s.proc.terminate(grace).await?;
        }
        if let Some(mut n) = nats {
            n.proc.terminate(grace).await?;
        }
        if let Some(mut c) = cluster {
            for n in &mut c.nodes {
                n.proc.terminate(grace).await?;
            }
        }
        Ok(())
    }
}

/// How identity `name` connects: its NKey seed from `creds` (none
/// without), and `tls`'s client settings.
fn auth_args(
    creds: Option<&Credentials>,
    tls: Option<&TlsFiles>,
    name: &str,
) -> twopc_common::nats::AuthArgs {
    let auth = creds.map(|c| c.auth(name)).unwrap_or_default();
    match tls {
        Some(t) => t.client(auth),
        None => auth,
    }
}

/// How many instances of the service `name` answer `$SRV.PING.<name>`
/// (distinct ids) within [`PING_WINDOW`]; stops listening once `enough`
/// have answered.
async fn instances(
    client: &async_nats::Client,
    name: &str,
    enough: usize,
) -> anyhow::Result<usize> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(
            twopc_common::micro::ping_subject(name),
            inbox,
            Vec::new().into(),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + PING_WINDOW;
    let mut ids = BTreeSet::new();
    while ids.len() < enough {
        match tokio::time::timeout_at(deadline, answers.next()).await {
            Ok(Some(m)) => {
                if let Ok(p) = serde_json::from_slice::<twopc_common::micro::Ping>(&m.payload) {
                    ids.insert(p.id);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    Ok(ids.len())
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
    fn a_kv_store_tells_the_coordinator_its_replicas_and_monitors() {
        let kv = DecisionStore::Kv {
            replicas: 3,
            monitor_urls: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
        };
        let env = kv.env();
        assert_eq!(get(&env, "TWOPC_STORE"), Some("kv"));
        assert_eq!(get(&env, "TWOPC_KV_REPLICAS"), Some("3"));
        assert_eq!(
            get(&env, "TWOPC_NATS_MONITOR"),
            Some("http://127.0.0.1:1,http://127.0.0.1:2")
        );
        assert!(
            DecisionStore::Sqlite.env().is_empty(),
            "SQLite: the default"
        );
    }

    #[test]
    fn replicas_are_named_after_the_first_coordinator() {
        let mut cfg =
            SystemConfig::new(Path::new("/tmp/x"), Binaries::beside_current_exe().unwrap());
        assert_eq!(
            cfg.services(),
            [
                ("coordinator", Kind::Coordinator),
                ("wallet", Kind::Wallet),
                ("order", Kind::Order)
            ]
        );
        cfg.nats = Nats::Cluster {
            nodes: 3,
            port: None,
        };
        cfg.coordinators = 3;
        cfg.check().unwrap();
        let names: Vec<_> = cfg.services().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "coordinator",
                "coordinator-2",
                "coordinator-3",
                "wallet",
                "order"
            ]
        );
    }

    #[test]
    fn replicas_without_a_cluster_and_bad_sizes_are_refused() {
        let mut cfg =
            SystemConfig::new(Path::new("/tmp/x"), Binaries::beside_current_exe().unwrap());
        cfg.check().unwrap();
        cfg.coordinators = 2;
        let err = cfg.check().unwrap_err().to_string();
        assert!(err.contains("shared decision log"), "{err}");
        cfg.coordinators = 0;
        assert!(cfg.check().is_err());
        for (nodes, ok) in [
            (1, false),
            (2, false),
            (3, true),
            (4, false),
            (5, true),
            (7, false),
        ] {
            cfg.nats = Nats::Cluster { nodes, port: None };
            cfg.coordinators = 2;
            assert_eq!(cfg.check().is_ok(), ok, "{nodes} nodes");
        }
        cfg.coordinators = MAX_COORDINATORS + 1;
        cfg.nats = Nats::Cluster {
            nodes: 3,
            port: None,
        };
        assert!(cfg.check().is_err());
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
