//! Connecting to NATS the way every twopc service does.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

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

/// How a client proves who it is to the server, and where its replies
/// arrive: the nats CLI's flags and variables, taken by every twopc
/// program (`#[command(flatten)]`).
///
/// With the server config twopc generates (`twopc auth init`, `twopc up`),
/// every connection must present an NKey seed, and each identity may
/// subscribe only below its own inbox prefix `_INBOX_<name>`: without
/// `--inbox-prefix` it is derived from the seed file's name
/// (`creds/wallet.nk` → `_INBOX_wallet`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// File holding an NKey user seed (`SU...`), as the nats CLI's --nkey.
    #[arg(long = "nkey", env = "NATS_NKEY", value_name = "FILE", global = true)]
    pub nkey: Option<PathBuf>,
    /// A JWT credentials file, as the nats CLI's --creds (servers in
    /// operator mode).
    #[arg(long = "creds", env = "NATS_CREDS", value_name = "FILE", global = true)]
    pub creds: Option<PathBuf>,
    /// Prefix of this client's reply subjects (default `_INBOX_<name>` for
    /// an NKey file `<name>.nk`, else `_INBOX`).
    #[arg(long = "inbox-prefix", env = "NATS_INBOX_PREFIX", global = true)]
    pub inbox_prefix: Option<String>,
    /// CA certificate(s) that sign the server's TLS certificate; turns TLS on.
    #[arg(long = "tlsca", env = "NATS_CA", value_name = "FILE", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (with --tlskey).
    #[arg(
        long = "tlscert",
        env = "NATS_CERT",
        value_name = "FILE",
        global = true
    )]
    pub tls_cert: Option<PathBuf>,
    /// Client certificate's private key (with --tlscert).
    #[arg(long = "tlskey", env = "NATS_KEY", value_name = "FILE", global = true)]
    pub tls_key: Option<PathBuf>,
}

impl AuthArgs {
    /// An NKey identity from its seed file, replies under its own prefix.
    pub fn nkey_file(path: impl Into<PathBuf>) -> Self {
        AuthArgs {
            nkey: Some(path.into()),
            ..Default::default()
        }
    }

    /// The reply prefix this client uses: the one given, else derived from
    /// the NKey file's name, else async-nats' `_INBOX`.
    pub fn inbox_prefix(&self) -> Option<String> {
        if let Some(p) = &self.inbox_prefix {
            return Some(p.clone());
        }
        let stem = self.nkey.as_ref()?.file_stem()?.to_str()?;
        Some(inbox_prefix(stem))
    }

    /// Applies these settings to `options`: reads the seed or credentials
    /// file (a missing or unreadable one is an error naming it).
    async fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> anyhow::Result<async_nats::ConnectOptions> {
        if let Some(path) = &self.nkey {
            let seed = read_seed(path)?;
            options = options.nkey(seed);
        }
        if let Some(path) = &self.creds {
            options = options
                .credentials_file(path)
                .await
                .with_context(|| format!("credentials file {}", path.display()))?;
        }
        if let Some(prefix) = self.inbox_prefix() {
            options = options.custom_inbox_prefix(prefix);
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                options = options
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true);
            }
            (None, None) => {}
            _ => anyhow::bail!("--tlscert and --tlskey go together"),
        }
        Ok(options)
    }
}

/// The reply prefix of identity `name`: `_INBOX_<name>`. The generated
/// permissions let `name` subscribe only below it.
pub fn inbox_prefix(name: &str) -> String {
    format!("_INBOX_{name}")
}

/// Reads an NKey seed file: the first line that looks like a user seed
/// (`SU...`), so that a file with comments, as `nsc` writes, works too.
pub fn read_seed(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading NKey seed file {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU"))
        .map(str::to_owned)
        .with_context(|| format!("no NKey user seed (SU...) in {}", path.display()))
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
    /// Credentials, inbox prefix and TLS.
    pub auth: AuthArgs,
}

impl ConnectSettings {
    /// A long-running client: waits for a server that is not up yet.
    pub fn retrying(name: &str) -> Self {
        ConnectSettings {
            name: name.to_owned(),
            first_connect: FirstConnect::Retry,
            auth: AuthArgs::default(),
        }
    }

    /// A one-shot command: fails if no server answers.
    pub fn fail_fast(name: &str) -> Self {
        ConnectSettings {
            name: name.to_owned(),
            first_connect: FirstConnect::FailFast,
            auth: AuthArgs::default(),
        }
    }

    /// These settings with `auth`'s credentials.
    pub fn with_auth(mut self, auth: &AuthArgs) -> Self {
        self.auth = auth.clone();
        self
    }
}

/// Connects as a service does: reconnects forever, a start that may
/// precede the server, and a short capped reconnect delay (a restarted
/// server is found within about a second).
pub async fn connect(url: &str, name: &str, auth: &AuthArgs) -> anyhow::Result<async_nats::Client> {
    connect_with(url, &ConnectSettings::retrying(name).with_auth(auth)).await
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
                    async_nats::Event::ServerError(e) => {
                        tracing::error!(service = %name, error = %e, "NATS server error (wrong credentials or a permission denied?)")
                    }
                    other => tracing::info!(service = %name, event = %other, "NATS event"),
                }
            }
        });
    if settings.first_connect == FirstConnect::Retry {
        options = options.retry_on_initial_connect();
    }
    options = settings.auth.apply(options).await?;
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

/// The latest value of a KV key and its revision, read from the bucket's
/// stream leader (a direct get may be served by a follower that has not
/// applied the latest write); `None` if the key was never written or its
/// latest entry is a delete or purge marker.
pub async fn kv_latest(
    kv: &async_nats::jetstream::kv::Store,
    key: &str,
) -> Result<Option<(bytes::Bytes, u64)>, async_nats::jetstream::stream::LastRawMessageError> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let subject = format!("$KV.{}.{key}", kv.name);
    match kv.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => {
            let deleted = m
                .headers
                .get("KV-Operation")
                .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
            Ok((!deleted).then_some((m.payload, m.sequence)))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e),
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
