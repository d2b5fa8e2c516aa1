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

/// What to do when the server cannot be reached at the first connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstConnect {
    /// Keep trying, in the background, as a service started before its
    /// server must (the call returns at once; requests wait or time out).
    Retry,
    /// Fail the call, as a one-shot command should (`twopc balance` with no
    /// server reachable says so instead of timing out).
    FailFast,
}

/// The one NATS connect recipe of twopc: services, the CLI, the launcher,
/// the chaos runner, the bench and the tests all connect through
/// [`connect_with`] (services through [`connect`]).
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// The client name the server shows (`nats server report connections`)
    /// and the `service` field of our connection log lines.
    pub name: String,
    pub first_connect: FirstConnect,
}

impl ConnectSettings {
    /// A long-running client: waits for a server that is not up yet.
    pub fn retrying(name: &str) -> Self {
        ConnectSettings {
            name: name.to_owned(),
            first_connect: FirstConnect::Retry,
        }
    }

    /// A one-shot command: fails if no server answers.
    pub fn fail_fast(name: &str) -> Self {
        ConnectSettings {
            name: name.to_owned(),
            first_connect: FirstConnect::FailFast,
        }
    }
}

/// Connects as a service does: reconnects forever, a start that may
/// precede the server, and a short capped reconnect delay (a restarted
/// server is found within about a second).
pub async fn connect(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    connect_with(url, &ConnectSettings::retrying(name)).await
}

/// Connects with reconnects forever and a short capped reconnect delay;
/// `settings` name the client and say what a first connect that fails does.
pub async fn connect_with(
    url: &str,
    settings: &ConnectSettings,
) -> anyhow::Result<async_nats::Client> {
    let addrs = server_addrs(url)?;
    let name_owned = settings.name.clone();
    let mut options = async_nats::ConnectOptions::new()
        .name(&settings.name)
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
        });
    if settings.first_connect == FirstConnect::Retry {
        options = options.retry_on_initial_connect();
    }
    let client = options.connect(addrs).await?;
    Ok(client)
}

/// How much longer than a request's own timeout its caller waits at most.
///
/// async-nats starts a request's timeout only once the request is in the
/// client's command channel; while the client is disconnected that channel
/// fills and `send_request` then waits without bound. Every protocol request
/// therefore also runs under an outer deadline of `timeout + this margin`.
pub const REQUEST_DEADLINE_MARGIN_MS: u64 = 250;

/// Longest a reply may wait to be queued for sending. A reply that cannot be
/// queued this long is dropped: the requester has timed out by then anyway
/// (and treats the outcome as unknown), and the handler must give back its
/// in-flight permit.
pub const REPLY_DEADLINE_MS: u64 = 1_000;

/// A request-reply bounded end to end: the reply, or an error within
/// `timeout` plus [`REQUEST_DEADLINE_MARGIN_MS`], connected or not. An outer
/// deadline that fires is reported as `TimedOut`: like every timeout, the
/// outcome is unknown (the request may or may not have been sent).
pub async fn request(
    client: &async_nats::Client,
    subject: impl async_nats::subject::ToSubject,
    request: async_nats::Request,
    timeout: Duration,
) -> Result<async_nats::Message, async_nats::RequestError> {
    let request = request.timeout(Some(timeout));
    let deadline = timeout + Duration::from_millis(REQUEST_DEADLINE_MARGIN_MS);
    match tokio::time::timeout(deadline, client.send_request(subject, request)).await {
        Ok(result) => result,
        Err(_) => Err(async_nats::RequestError::new(
            async_nats::RequestErrorKind::TimedOut,
        )),
    }
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
