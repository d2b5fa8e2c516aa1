//! `twopc up`: a local system for people, with demo data; Ctrl-C stops it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use twopc_launcher::{Binaries, Nats, System, SystemConfig};

use super::seed::{demo, seed};

pub async fn run(
    data_dir: PathBuf,
    port: u16,
    no_demo: bool,
    nats_url_env: Option<String>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    let mut cfg = SystemConfig::new(&data_dir, Binaries::beside_current_exe()?);
    cfg.client_name = "twopc-up".into();
    cfg.ready_timeout = Duration::from_secs(20);
    let sys = match nats_url_env {
        Some(url) => {
            println!("using NATS at {url} (from NATS_URL)");
            cfg.nats = Nats::Use { url };
            System::start(cfg).await?
        }
        None => {
            cfg.nats = Nats::Start { port: Some(port) };
            let sys = System::start(cfg).await.context(
                "starting the system (is the port in use? set NATS_URL to use a running nats-server)",
            )?;
            println!("nats-server listening on {}", sys.url);
            sys
        }
    };
    for s in sys.services.values() {
        println!(
            "{:<12} running (pid {}), log {}",
            s.kind.name(),
            s.proc.pid().unwrap_or(0),
            s.proc.log_path().display()
        );
    }
    if !no_demo {
        seed(&sys.client, &demo(), Duration::from_secs(5)).await?;
    }
    let url = &sys.url;
    println!(
        "\ntwopc is up. Buy something:\n\
         \n  nats --server {url} req shop.purchase '{{\"user\":\"alice\",\"sku\":\"book-1\",\"qty\":2,\"amount\":2500}}'\
         \n  NATS_URL={url} twopc purchase --user alice --sku book-1 --qty 2\
         \n  NATS_URL={url} twopc balance alice\
         \n  NATS_URL={url} twopc stock book-1\n\
         \nData and logs in {}. Ctrl-C stops everything.",
        data_dir.display()
    );
    twopc_common::nats::shutdown_signal().await;
    println!("stopping");
    sys.stop(Duration::from_secs(5)).await
}
