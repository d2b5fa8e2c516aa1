//! `twopc up`: a local system for people, with demo data; Ctrl-C stops it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use twopc_launcher::{Binaries, Kind, NatsServer, Service, Settings};

use super::seed::{demo, seed};

pub async fn run(
    data_dir: PathBuf,
    port: u16,
    no_demo: bool,
    nats_url_env: Option<String>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir)?;
    let data_dir = data_dir.canonicalize()?;
    let mut nats = None;
    let url = match nats_url_env {
        Some(url) => {
            println!("using NATS at {url} (from NATS_URL)");
            url
        }
        None => {
            let s = NatsServer::start(&data_dir.join("nats"), Some(port)).context(
                "starting nats-server (is port in use? set NATS_URL to use a running one)",
            )?;
            println!("nats-server listening on {}", s.url());
            let url = s.url();
            nats = Some(s);
            url
        }
    };
    let bins = Binaries::beside_current_exe()?;
    let client = twopc_common::nats::connect(&url, "twopc-up").await?;
    let mut services = vec![];
    for kind in Kind::ALL {
        let mut s = Service::new(kind, &bins, &data_dir, &url, &Settings::default())?;
        s.proc.start()?;
        s.wait_ready(&client, Duration::from_secs(20)).await?;
        println!(
            "{:<12} running (pid {}), log {}",
            kind.name(),
            s.proc.pid().unwrap_or(0),
            s.proc.log_path().display()
        );
        services.push(s);
    }
    if !no_demo {
        seed(&client, &demo(), Duration::from_secs(5)).await?;
    }
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
    for s in services.iter_mut().rev() {
        s.proc.terminate(Duration::from_secs(5))?;
    }
    drop(nats);
    Ok(())
}
