//! Connecting to NATS the way every twopc service does.

use std::time::Duration;

/// The default server, as the nats CLI assumes.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// Parses `NATS_URL`-style lists: comma-separated, as the nats CLI accepts.
/// async-nats does not split them itself.
pub fn server_addrs(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    let addrs = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<async_nats::ServerAddr>()
                .map_err(|e| anyhow::anyhow!("bad NATS URL {s:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!addrs.is_empty(), "no NATS URL given");
    Ok(addrs)
}

/// Connects with reconnects forever, a start that may precede the server,
/// and a short capped reconnect delay (a restarted server is found within
/// about a second).
pub async fn connect(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    let addrs = server_addrs(url)?;
    let name_owned = name.to_owned();
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((50u64 << attempts.min(5) as u64).min(1000))
        })
        .event_callback(move |event| {
            let name = name_owned.clone();
            async move {
                match event {
                    async_nats::Event::Connected => tracing::info!(service = %name, "connected to NATS"),
                    async_nats::Event::Disconnected => tracing::warn!(service = %name, "disconnected from NATS"),
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::error!(service = %name, sid, "slow consumer: NATS dropped messages")
                    }
                    other => tracing::info!(service = %name, event = %other, "NATS event"),
                }
            }
        })
        .connect(addrs)
        .await?;
    Ok(client)
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
