//! `twopc up`: a local system for people, with demo data; Ctrl-C stops it.
//! With `--cluster 3`, a JetStream cluster of three nats-servers and two
//! coordinator replicas sharing their decision log in it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use twopc_launcher::{Binaries, Nats, System, SystemConfig, TlsFiles};

use super::seed::{demo, seed};

#[derive(clap::Args)]
pub struct UpArgs {
    /// Folder for the services' databases and logs.
    #[arg(long, default_value = ".twopc")]
    pub data_dir: PathBuf,
    /// Port of the nats-server started here (when NATS_URL is not set);
    /// with --cluster, the first node's (the others take the next ports).
    #[arg(long, default_value_t = 4222)]
    pub port: u16,
    /// Do not create the demo users and products.
    #[arg(long)]
    pub no_demo: bool,
    /// Start a JetStream cluster of N nats-servers (3; 5 also works) with
    /// `sync_interval: always`; the coordinators keep their decisions in a
    /// KV bucket replicated on every node.
    #[arg(long, value_name = "N")]
    pub cluster: Option<usize>,
    /// Coordinator replicas (default: 2 with --cluster, else 1; more than
    /// one needs --cluster, where they share their decision log).
    #[arg(long)]
    pub coordinators: Option<usize>,
    /// Mutual TLS, beside the credentials: the nats-server(s) started here
    /// require TLS and a client certificate, with the local CA and the
    /// certificates `scripts/make-ca.sh DIR` makes in DIR (made there now
    /// if missing; for tests and local use). Every service and the CLI
    /// connect with them.
    #[arg(long, value_name = "DIR")]
    pub tls: Option<PathBuf>,
    /// A participant of your own to make room for (repeatable): an NKey
    /// identity `<creds>/<NAME>.nk` with a participant's permissions, and
    /// the coordinator told the name (`TWOPC_PARTICIPANTS`). You start it
    /// (e.g. `target/go/twopc-shipping`, or one written on the SDK).
    #[arg(long = "participant", value_name = "NAME")]
    pub participants: Vec<twopc_schemas::ParticipantName>,
}

pub async fn run(args: UpArgs, nats_url_env: Option<String>) -> anyhow::Result<()> {
    let UpArgs {
        data_dir,
        port,
        no_demo,
        cluster,
        coordinators,
        tls,
        participants,
    } = args;
    std::fs::create_dir_all(&data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    let tls = match tls {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            let dir = dir.canonicalize()?;
            Some(TlsFiles::ensure(&dir).context("--tls")?)
        }
        None => None,
    };
    let mut cfg = SystemConfig::new(&data_dir, Binaries::beside_current_exe()?);
    cfg.client_name = "twopc-up".into();
    cfg.ready_timeout = Duration::from_secs(20);
    cfg.tls = tls.clone();
    cfg.coordinators = coordinators.unwrap_or(if cluster.is_some() { 2 } else { 1 });
    if !participants.is_empty() {
        let known: Vec<String> = twopc_schemas::participant::PURCHASE_PARTICIPANTS
            .iter()
            .chain(&participants)
            .map(|p| p.to_string())
            .collect();
        cfg.coordinator
            .extra_env
            .push(("TWOPC_PARTICIPANTS".into(), known.join(",")));
        cfg.more_participants = participants.clone();
    }
    cfg.nats = match (cluster, nats_url_env) {
        (Some(_), Some(url)) => {
            bail!("--cluster starts its own nats-servers, but NATS_URL is set ({url}): unset it")
        }
        (Some(nodes), None) => Nats::Cluster {
            nodes,
            port: Some(port),
        },
        (None, Some(url)) => {
            println!("using NATS at {url} (from NATS_URL)");
            Nats::Use { url }
        }
        (None, None) => Nats::Start { port: Some(port) },
    };
    // Refuse a bad --cluster or --coordinators before anything starts.
    cfg.check()?;
    let started_here = !matches!(cfg.nats, Nats::Use { .. });
    let sys = System::start(cfg).await.with_context(|| {
        if started_here {
            "starting the system (is a port in use? set NATS_URL to use a running nats-server)"
        } else {
            "starting the system"
        }
    })?;
    if let Some(c) = &sys.cluster {
        println!(
            "nats-server cluster of {} (JetStream, sync_interval: always):",
            c.nodes.len()
        );
        for n in &c.nodes {
            println!(
                "  {}  monitoring {}  (pid {})",
                n.url(),
                n.monitor_url(),
                n.proc.pid().unwrap_or(0)
            );
        }
        println!("NATS_URL={}", sys.url);
        println!("monitoring: {}", c.monitor_urls().join(","));
    } else if let Some(n) = &sys.nats {
        println!(
            "nats-server listening on {} (monitoring {})",
            sys.url,
            n.monitor_url()
        );
    }
    for s in sys.services.values() {
        println!(
            "{:<14} running (pid {}), log {}",
            s.name,
            s.proc.pid().unwrap_or(0),
            s.proc.log_path().display()
        );
    }
    if !no_demo {
        seed(&sys.client, &demo(), Duration::from_secs(5)).await?;
    }
    let creds = sys
        .creds
        .as_ref()
        .map(|c| c.dir.clone())
        .context("twopc up runs with credentials")?;
    if !started_here && anonymous_allowed(&sys.url, tls.as_ref()).await {
        println!(
            "\nwarning: the server at NATS_URL accepts connections without credentials, so \
             anyone who reaches it can forge protocol messages and take money. Add \
             `include {}` to its config (and restart it) to enforce each role's permissions.",
            creds.join(twopc_launcher::auth::AUTH_CONF).display()
        );
    }
    let url = &sys.url;
    let shop = &sys.shop.name;
    // The CLI finds the credentials in .twopc/creds by itself; elsewhere it
    // needs TWOPC_CREDS_DIR.
    let mut env = if creds
        == std::path::Path::new(".twopc/creds")
            .canonicalize()
            .unwrap_or_default()
    {
        format!("NATS_URL={url}")
    } else {
        format!("TWOPC_CREDS_DIR={} NATS_URL={url}", creds.display())
    };
    // With TLS: the nats CLI's flags, and the variables both CLIs read.
    let mut tls_flags = String::new();
    if let Some(t) = &tls {
        tls_flags = format!(
            " --tlsca {} --tlscert {} --tlskey {}",
            t.ca.display(),
            t.client_cert.display(),
            t.client_key.display()
        );
        env = format!(
            "NATS_CA={} NATS_CERT={} NATS_KEY={} {env}",
            t.ca.display(),
            t.client_cert.display(),
            t.client_key.display()
        );
        println!(
            "\nTLS: mutual TLS required{}: the server's certificate is signed by the local CA \
             {} (for tests and local use); clients trust it and present {} (key {}), as \
             the nats CLI's --tlsca/--tlscert/--tlskey or NATS_CA/NATS_CERT/NATS_KEY.",
            if started_here {
                ""
            } else {
                " (if the server at NATS_URL is configured for it)"
            },
            t.ca.display(),
            t.client_cert.display(),
            t.client_key.display()
        );
    }
    println!(
        "\nCredentials: one NKey seed per role in {creds} (readable by you only; the server \
         refuses connections without one):\
         \n  {shop}.nk (shop client {shop}: buys on shop.{shop}.purchase, reads its own on \
         shop.{shop}.tx), admin.nk (creates users and products, reads everything)\n\
         \ntwopc is up. Buy something:\n\
         \n  nats --server {url}{tls_flags} --nkey {creds}/{shop}.nk --inbox-prefix _INBOX_{shop} req shop.{shop}.purchase '{{\"user\":\"alice\",\"sku\":\"book-1\",\"qty\":2,\"amount\":2500,\"request_id\":\"my-first\"}}'\
         \n  {env} twopc purchase --user alice --sku book-1 --qty 2\
         \n  {env} twopc balance alice\
         \n  {env} twopc stock book-1\n\
         \nData and logs in {}. Ctrl-C stops everything.",
        data_dir.display(),
        creds = creds.display(),
    );
    for p in &participants {
        println!(
            "\nParticipant {p}: the coordinator knows it; start it yourself with\n  \
             NATS_URL={url} NATS_NKEY={creds}/{p}.nk TWOPC_DATA_DIR={data}/{p} <its binary>\n\
             (e.g. target/go/twopc-shipping for shipping, built by scripts/test-go.sh)",
            url = sys.url,
            creds = creds.display(),
            data = data_dir.display(),
        );
    }
    twopc_common::nats::shutdown_signal().await;
    println!("stopping");
    sys.stop(Duration::from_secs(5)).await
}

/// Whether the server at `url` lets a client in without credentials (over
/// TLS with `tls`, so that only the missing NKey can make it refuse).
async fn anonymous_allowed(url: &str, tls: Option<&TlsFiles>) -> bool {
    let auth = tls
        .map(|t| t.client(Default::default()))
        .unwrap_or_default();
    twopc_common::nats::connect_with(
        url,
        &twopc_common::nats::ConnectSettings::fail_fast("twopc-up-auth-check").with_auth(&auth),
    )
    .await
    .is_ok()
}

/// `twopc auth init`: the identities and the server's config fragments in
/// `dir`.
pub fn auth_init(
    dir: &std::path::Path,
    mut clients: Vec<twopc_schemas::ClientName>,
    routes: &[String],
) -> anyhow::Result<()> {
    use twopc_launcher::auth;
    if clients.is_empty() {
        clients.push(auth::default_client());
    }
    let creds = auth::Credentials::ensure(
        dir,
        &auth::roles(&clients, &[]),
        twopc_schemas::subjects::DECISION_BUCKET,
    )?;
    for i in &creds.identities {
        println!("{}", creds.seed_file(i.role.name()).display());
    }
    println!("{}", dir.join(auth::AUTH_CONF).display());
    if !routes.is_empty() {
        println!("{}", creds.write_cluster_auth(routes)?.display());
    }
    Ok(())
}
