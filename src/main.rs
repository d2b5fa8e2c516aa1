//! `twopc`: run a local system and talk to it.
//!
//! Reads `NATS_URL` as the nats CLI does. See `twopc --help`. This file only
//! parses the command line and dispatches; the commands live in `cli/`.

mod cli;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use twopc_common::nats::AuthArgs;
use twopc_schemas::ClientName;

#[derive(Parser)]
#[command(
    version,
    about = "twopc: atomic purchases across microservices over NATS"
)]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "NATS_URL", default_value = twopc_common::nats::DEFAULT_URL)]
    nats_url: String,
    /// How long to wait for a reply, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    timeout_ms: u64,
    #[command(flatten)]
    auth: AuthArgs,
    /// Where `twopc up` keeps the identities' NKey seeds: without --nkey or
    /// --creds, each command uses the identity it needs from here (a
    /// purchase the shop client's, everything else admin's).
    #[arg(
        long,
        global = true,
        env = "TWOPC_CREDS_DIR",
        default_value = ".twopc/creds"
    )]
    creds_dir: PathBuf,
    /// The shop client that buys (`shop.<client>.purchase`).
    #[arg(long, global = true, env = "TWOPC_CLIENT", default_value = twopc_schemas::client::DEFAULT_CLIENT)]
    client: ClientName,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start nats-server (unless NATS_URL is set; a cluster with
    /// --cluster 3) and the three services with demo users and products;
    /// Ctrl-C stops them.
    Up(cli::up::UpArgs),
    /// Buy `qty` of `sku` for `user`. The amount defaults to price × qty.
    Purchase {
        #[arg(long)]
        user: String,
        #[arg(long)]
        sku: String,
        #[arg(long, default_value_t = 1)]
        qty: u64,
        /// Total in minor units (cents); looked up when omitted.
        #[arg(long)]
        amount: Option<u64>,
        /// Idempotency key: retrying with it never charges twice.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Any transaction: its JSON as on `shop.<client>.transaction`,
    /// `{"branches":[{"participant","op"},...],"request_id"?}`. Retries by
    /// request id until the reply timeout; "unknown" is not an abort.
    Transaction { json: String },
    /// A user's balance.
    Balance { user: String },
    /// A product's price and stock.
    Stock { sku: String },
    /// A transaction's story: the coordinator's record and each participant.
    Tx { id: String },
    /// Transactions not yet resolved anywhere: in phase 1 or undelivered at
    /// the coordinator, prepared (in doubt) at a participant.
    InDoubt,
    /// Who owns each participant name: the data store bound to it, the
    /// owner epoch and the live instance (host, pid, folder), or none.
    Owners,
    /// Create a user with an opening balance (minor units).
    CreateUser {
        user: String,
        #[arg(long)]
        balance: u64,
    },
    /// Create a product with a unit price (minor units) and stock.
    CreateProduct {
        sku: String,
        #[arg(long)]
        price: u64,
        #[arg(long)]
        stock: u64,
    },
    /// Run a real system under a purchase workload while a seeded nemesis
    /// injects faults; then heal, wait for quiescence and check every
    /// invariant. Exits 1 if any invariant is violated.
    Chaos(cli::chaos::ChaosArgs),
    /// The deterministic simulation: many seeded schedules of the protocol
    /// code under simulated faults (`--seeds`), or one replayed (`--seed`).
    /// Exits 1 if any schedule breaks an invariant.
    Sim(cli::sim::SimArgs),
    /// Measure purchases/s and latency against a running system (NATS_URL)
    /// or one started here (--start), with same-run baselines and ratios.
    Bench(cli::bench::BenchArgs),
    /// Exit 0 if the named service answers `$SRV.PING.<service>` (for
    /// container health checks).
    Ping { service: String },
    /// The empty responder of the bench's NATS baseline (internal).
    #[command(hide = true)]
    Echo {
        #[arg(long)]
        subject: String,
    },
    /// Credentials for a NATS server of one's own (compose, a deployment).
    #[command(subcommand)]
    Auth(AuthCmd),
    /// Create users and products from a JSON file:
    /// `{"users": [{"user", "balance"}], "products": [{"sku", "price", "stock"}]}`.
    Seed { file: PathBuf },
}

#[derive(Subcommand)]
enum AuthCmd {
    /// Make (or keep) one NKey identity per role in DIR — seeds `<name>.nk`
    /// readable by you only — and `auth.conf`, the users and permissions
    /// for a nats-server config to `include`; with --route, also
    /// `cluster-auth.conf`, the routes with their password for the cluster
    /// block. Existing seeds are kept.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Shop clients, comma-separated (default: web).
        #[arg(long, value_delimiter = ',')]
        clients: Vec<ClientName>,
        /// Cluster routes `host:port`, e.g. n1:6222 (repeat per node).
        #[arg(long = "route")]
        routes: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    twopc_common::logging::init("warn", twopc_common::logging::LogFormat::Human);
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(cli.timeout_ms);
    let ids = cli::Identities {
        explicit: cli.auth.clone(),
        dir: cli.creds_dir.clone(),
    };
    // Who this command is: the shop client buys; everything else is admin.
    let identity = match &cli.cmd {
        Cmd::Purchase { .. } | Cmd::Transaction { .. } => cli.client.as_str().to_owned(),
        _ => "admin".to_owned(),
    };
    let client = match cli.cmd {
        Cmd::Chaos(a) => return cli::chaos::run(a).await,
        Cmd::Sim(a) => return cli::sim::run(a),
        Cmd::Auth(AuthCmd::Init {
            dir,
            clients,
            routes,
        }) => return cli::up::auth_init(&dir, clients, &routes),
        Cmd::Bench(a) => return cli::bench::run(a, cli.nats_url, ids.auth("admin")).await,
        Cmd::Up(a) => {
            let env_url = std::env::var("NATS_URL").ok().filter(|s| !s.is_empty());
            return cli::up::run(a, env_url).await;
        }
        _ => twopc_common::nats::connect_with(
            &cli.nats_url,
            &twopc_common::nats::ConnectSettings::fail_fast("twopc-cli")
                .with_auth(&ids.auth(&identity)),
        )
        .await
        .with_context(|| format!("connecting to NATS at {}", cli.nats_url))?,
    };
    match cli.cmd {
        Cmd::Up(_) | Cmd::Chaos(_) | Cmd::Sim(_) | Cmd::Bench(_) | Cmd::Auth(_) => {
            unreachable!("dispatched above")
        }
        Cmd::Echo { subject } => twopc_verify::bench::echo(client, subject).await,
        Cmd::Purchase {
            user,
            sku,
            qty,
            amount,
            request_id,
        } => {
            let shop = twopc_launcher::client::Shop {
                client,
                name: cli.client,
            };
            cli::ops::purchase(&shop, timeout, user, sku, qty, amount, request_id).await
        }
        Cmd::Transaction { json } => cli::ops::transaction(client, cli.client, timeout, json).await,
        Cmd::Balance { user } => cli::ops::balance(&client, timeout, user).await,
        Cmd::Stock { sku } => cli::ops::stock(&client, timeout, sku).await,
        Cmd::Tx { id } => cli::ops::tx(&client, timeout, id).await,
        Cmd::Ping { service } => cli::ops::ping(&client, timeout, service).await,
        Cmd::InDoubt => cli::ops::in_doubt(&client, timeout).await,
        Cmd::Owners => cli::ops::owners(&client).await,
        Cmd::CreateUser { user, balance } => {
            cli::ops::create_user(&client, timeout, user, balance).await
        }
        Cmd::CreateProduct { sku, price, stock } => {
            cli::ops::create_product(&client, timeout, sku, price, stock).await
        }
        Cmd::Seed { file } => cli::seed::from_file(&client, &file, timeout).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand's flags are consistent (clap checks names, globals
    /// and defaults only when a command is built: here, not at a user's
    /// first run).
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
