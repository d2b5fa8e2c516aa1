//! Child processes we own: started with a log file, signalled, killed and
//! started again with the same command line; and `nats-server` on fixed
//! ports, started from a config file written here (JetStream on, every
//! write fsynced before it is acknowledged).

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Runs a program as another user (util-linux); it execs, so the pid is
/// the program's.
pub const SETPRIV: &str = "/usr/bin/setpriv";

/// How often an asynchronous wait for a child's exit looks at it.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// Where the service binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub coordinator: PathBuf,
    pub wallet: PathBuf,
    pub order: PathBuf,
}

impl Binaries {
    /// The binaries next to the running executable (as `cargo build` and an
    /// install lay them out).
    pub fn beside_current_exe() -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("executable has a folder")?;
        Ok(Binaries {
            coordinator: dir.join("twopc-coordinator"),
            wallet: dir.join("twopc-wallet"),
            order: dir.join("twopc-order"),
        })
    }
}

/// Finds `nats-server`: `$NATS_SERVER_BIN`, the project's `.tools` venv
/// (made by `scripts/install-nats.sh`), then `PATH`.
pub fn find_nats_server() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        if Path::new(&p).is_file() {
            return Ok(p.into());
        }
    }
    let mut candidates = vec![];
    // The workspace root, one folder up from this crate.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(root.join(".tools/nats-venv/bin/nats-server"));
    if let Ok(path) = std::env::var("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    candidates.push("/usr/sbin/nats-server".into());
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("nats-server not found: run scripts/install-nats.sh or set NATS_SERVER_BIN")
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `n` distinct free TCP ports on the loopback interface, none of them in
/// `taken`. Each stays bound until all are found, so the kernel cannot
/// hand out one twice.
pub fn free_ports(n: usize, taken: &[u16]) -> anyhow::Result<Vec<u16>> {
    let mut held = vec![];
    let mut ports = vec![];
    // Bounded: a port in `taken` is skipped, and the kernel gives out each
    // ephemeral port only once while it is bound.
    for _ in 0..n + taken.len() + 16 {
        if ports.len() == n {
            break;
        }
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if !taken.contains(&port) {
            ports.push(port);
        }
        held.push(listener);
    }
    if ports.len() < n {
        bail!("found only {} of {n} free ports", ports.len());
    }
    Ok(ports)
}

/// Sends a signal to a process we started.
pub fn signal(pid: u32, sig: i32) -> anyhow::Result<()> {
    // SAFETY: kill(2) with a pid of a child we spawned and still own.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    if rc != 0 {
        bail!(
            "kill({pid}, {sig}) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// One child process that can be killed, stopped and started again with
/// the same command line.
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_path: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn new(
        name: &str,
        program: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        log_path: PathBuf,
    ) -> Self {
        Proc {
            name: name.to_owned(),
            program: program.to_owned(),
            args,
            env,
            log_path,
            child: None,
        }
    }

    /// Starts the process; its stdout and stderr append to its log file.
    pub fn start(&mut self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = signal(c.id(), libc::SIGCONT);
            let _ = c.kill();
            c.wait()?;
        }
        Ok(())
    }

    /// Waits (asynchronously) up to `timeout` for the process to exit by
    /// itself and reaps it; `None` if it is still running then.
    async fn exited_within(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.child.as_mut().context("not running")?;
            if let Some(status) = c.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            // std's Child has no async wait; poll its state without
            // blocking the runtime's thread.
            tokio::time::sleep(EXIT_POLL).await;
        }
    }

    /// SIGTERM, then wait (asynchronously) up to `grace` before SIGKILL.
    pub async fn terminate(&mut self, grace: Duration) -> anyhow::Result<()> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        let _ = signal(pid, libc::SIGCONT);
        let _ = signal(pid, libc::SIGTERM);
        if self.exited_within(grace).await?.is_none() {
            self.kill()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `timeout` for the process to exit by
    /// itself; returns its exit status (an error if it had to be killed).
    pub async fn sigterm_and_wait(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.pid().context("not running")?;
        signal(pid, libc::SIGTERM)?;
        match self.exited_within(timeout).await? {
            Some(status) => Ok(status),
            None => {
                self.kill()?;
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
        }
    }

    /// Waits for the process to exit by itself (a crash point), up to
    /// `timeout`; returns its exit status description.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<String> {
        match self.exited_within(timeout).await? {
            Some(status) => Ok(format!("{status:?}")),
            None => bail!("{} did not exit within {timeout:?}", self.name),
        }
    }

    /// SIGSTOP: the process freezes but keeps its sockets.
    pub fn pause(&self) -> anyhow::Result<()> {
        signal(self.pid().context("not running")?, libc::SIGSTOP)
    }

    /// SIGCONT.
    pub fn resume(&self) -> anyhow::Result<()> {
        signal(self.pid().context("not running")?, libc::SIGCONT)
    }

    /// Another process with this one's command line and environment, its
    /// own name and log file, not started.
    pub fn duplicate(&self, name: &str, log_path: PathBuf) -> Proc {
        Proc::new(
            name,
            &self.program,
            self.args.clone(),
            self.env.clone(),
            log_path,
        )
    }

    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_owned(), v.to_owned()));
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The config file of a nats-server, in its folder; written at every start
/// from a [`ServerConfig`], read again by a restart.
pub const CONFIG_FILE: &str = "nats-server.conf";

/// JetStream's file storage limit per server.
pub const JS_MAX_FILE_STORE_BYTES: u64 = 1 << 30;

/// JetStream's memory storage limit per server (twopc keeps nothing in
/// memory streams; the limit only bounds what the server may reserve).
pub const JS_MAX_MEMORY_STORE_BYTES: u64 = 256 << 20;

/// Longest a started nats-server may take to listen on its client port.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a single (unclustered) server may take from listening until
/// JetStream is ready.
const SINGLE_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a wait for a server to listen tries to connect.
const LISTEN_POLL: Duration = Duration::from_millis(20);

/// How often a wait for JetStream asks the server's health endpoint.
const HEALTH_POLL: Duration = Duration::from_millis(50);

/// Longest one health request may take (a loopback GET takes about a
/// millisecond; a stopped server never answers).
const HEALTH_GET_TIMEOUT: Duration = Duration::from_secs(1);

/// What a nats-server's config file says ([`ServerConfig::text`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// `server_name`: unique in a cluster and the same across restarts
    /// (JetStream knows its peers by their names).
    pub name: String,
    /// The client port, on 127.0.0.1.
    pub port: u16,
    /// The monitoring port (`/healthz`, `/varz`, `/jsz`), on 127.0.0.1.
    pub monitor_port: u16,
    /// JetStream's store; the server keeps its files in `jetstream/` below.
    /// Distinct per server.
    pub store_dir: PathBuf,
    /// Membership of a cluster; `None` for a single server.
    pub cluster: Option<ClusterMembership>,
    /// Run the server as this user id (through `setpriv`), so that its
    /// packets can be told apart from other nodes' (see
    /// `NatsCluster::isolate`); `None`: as the caller.
    pub run_as: Option<u32>,
    /// Who may connect and what each may do (and, in a cluster, the
    /// routes' password); `None`: anyone may do anything.
    pub auth: Option<crate::auth::Credentials>,
    /// TLS required on the client port (and, in a cluster, on the routes);
    /// `None`: plain TCP.
    pub tls: Option<ServerTls>,
}

/// Longest a TLS handshake may take (nats-server's `tls.timeout`; its
/// default, 0.5 s, is short for a loaded test machine).
pub const TLS_HANDSHAKE_TIMEOUT_S: u32 = 2;

/// A nats-server's TLS: rendered as its `tls { }` block
/// ([`ServerTls::block`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The server's certificate (chain) and key, PEM.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that client certificates (and, in a cluster, the other
    /// nodes' route certificates) must be signed by.
    pub ca: PathBuf,
    /// Mutual TLS: a client without a certificate signed by `ca` is
    /// refused in the handshake (routes always verify).
    pub verify: bool,
}

impl ServerTls {
    /// The `tls { }` block, each line indented by `indent`; `verify`
    /// overrides [`ServerTls::verify`] (routes always verify).
    fn block(&self, indent: &str, verify: bool) -> anyhow::Result<String> {
        let path = |p: &Path| -> anyhow::Result<String> {
            quote(
                p.to_str()
                    .with_context(|| format!("TLS file path is not UTF-8: {}", p.display()))?,
            )
        };
        let mut t = format!("{indent}tls {{\n");
        t.push_str(&format!("{indent}  cert_file: {}\n", path(&self.cert)?));
        t.push_str(&format!("{indent}  key_file: {}\n", path(&self.key)?));
        t.push_str(&format!("{indent}  ca_file: {}\n", path(&self.ca)?));
        t.push_str(&format!("{indent}  verify: {verify}\n"));
        t.push_str(&format!("{indent}  timeout: {TLS_HANDSHAKE_TIMEOUT_S}\n"));
        t.push_str(&format!("{indent}}}\n"));
        Ok(t)
    }
}

/// One server's part of a cluster's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMembership {
    /// The cluster's name, the same on every node.
    pub name: String,
    /// This server's route port, on 127.0.0.1.
    pub route_port: u16,
    /// The route port of every node, this one's included (a route to itself
    /// is ignored). On a fresh store JetStream expects as many peers as
    /// there are routes before it elects its first meta leader.
    pub route_ports: Vec<u16>,
}

impl ServerConfig {
    /// The config file's text. Every string is quoted (a path may hold
    /// spaces, `#`, `$` or `{`); a path that is not UTF-8 or holds control
    /// characters is refused.
    pub fn text(&self) -> anyhow::Result<String> {
        let store_dir = self
            .store_dir
            .to_str()
            .with_context(|| format!("store dir is not UTF-8: {}", self.store_dir.display()))?;
        let mut t = String::new();
        t.push_str("# Written by twopc-launcher at every start of this server.\n");
        t.push_str(&format!("server_name: {}\n", quote(&self.name)?));
        t.push_str(&format!(
            "listen: {}\n",
            quote(&format!("127.0.0.1:{}", self.port))?
        ));
        t.push_str(&format!(
            "http: {}\n",
            quote(&format!("127.0.0.1:{}", self.monitor_port))?
        ));
        t.push_str("jetstream {\n");
        t.push_str(&format!("  store_dir: {}\n", quote(store_dir)?));
        t.push_str(
            "  # Durability: fsync every write before it is acknowledged (the\n  \
             # default syncs every 2 minutes and acknowledges before).\n",
        );
        t.push_str("  sync_interval: always\n");
        t.push_str(&format!("  max_file_store: {JS_MAX_FILE_STORE_BYTES}\n"));
        t.push_str(&format!(
            "  max_memory_store: {JS_MAX_MEMORY_STORE_BYTES}\n"
        ));
        t.push_str("}\n");
        if let Some(auth) = &self.auth {
            t.push_str(&auth.authorization(twopc_schemas::subjects::DECISION_BUCKET));
        }
        if let Some(tls) = &self.tls {
            t.push_str("# Clients must speak TLS (a plain connection is refused).\n");
            t.push_str(&tls.block("", tls.verify)?);
        }
        if let Some(c) = &self.cluster {
            let routes = c
                .route_ports
                .iter()
                .map(|&p| {
                    quote(&match &self.auth {
                        Some(auth) => auth.route_url(p),
                        None => format!("nats-route://127.0.0.1:{p}"),
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            t.push_str("cluster {\n");
            t.push_str(&format!("  name: {}\n", quote(&c.name)?));
            t.push_str(&format!(
                "  listen: {}\n",
                quote(&format!("127.0.0.1:{}", c.route_port))?
            ));
            t.push_str(&format!("  routes: [{}]\n", routes.join(", ")));
            if let Some(auth) = &self.auth {
                t.push_str(&format!("  {}\n", auth.route_authorization()));
            }
            if let Some(tls) = &self.tls {
                // Routes present the server certificate to each other (it
                // is made for client auth too) and verify the other's.
                t.push_str(&tls.block("  ", true)?);
            }
            if self.run_as.is_some() {
                // An isolatable node: a route whose packets are dropped is
                // seen dead after three missed pings, not minutes of TCP
                // retransmission.
                t.push_str("  ping_interval: \"1s\"\n  ping_max: 3\n");
            }
            t.push_str("}\n");
        }
        Ok(t)
    }
}

/// `s` as a double-quoted string of the nats-server config format: `"` and
/// `\` escaped; nothing in it is a variable (`$X` expands only unquoted).
fn quote(s: &str) -> anyhow::Result<String> {
    if s.chars().any(char::is_control) {
        bail!("control character in a nats-server config value: {s:?}");
    }
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// A `nats-server` on fixed loopback ports, started from a config file in
/// its folder, with JetStream on and every write fsynced before it is
/// acknowledged; restartable on the same ports with the same store.
pub struct NatsServer {
    /// Its `server_name` (a cluster's `/jsz` names the meta leader by it).
    pub name: String,
    /// The client port.
    pub port: u16,
    /// The monitoring port ([`NatsServer::monitor_url`]).
    pub monitor_port: u16,
    pub proc: Proc,
    /// The config file it runs from (written at start, read by restarts).
    pub config_path: PathBuf,
    /// Longest a (re)start may take from listening until JetStream is
    /// ready: longer for a cluster node, which waits for a meta leader.
    ready_timeout: Duration,
}

impl NatsServer {
    /// Starts a single server (no cluster) with its files in `dir` and
    /// waits (asynchronously) until it listens and JetStream is ready.
    pub async fn start(dir: &Path, port: Option<u16>) -> anyhow::Result<Self> {
        NatsServer::start_with(dir, port, None, None).await
    }

    /// As [`NatsServer::start`], with `auth`'s users and permissions: only
    /// they may connect; with `tls`, only over TLS.
    pub async fn start_with(
        dir: &Path,
        port: Option<u16>,
        auth: Option<crate::auth::Credentials>,
        tls: Option<ServerTls>,
    ) -> anyhow::Result<Self> {
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        let monitor_port = free_ports(1, &[port])?[0];
        let config = ServerConfig {
            run_as: None,
            name: format!("twopc-{port}"),
            port,
            monitor_port,
            store_dir: dir.join("js"),
            cluster: None,
            auth,
            tls,
        };
        let mut s = NatsServer::spawn(dir, &config, SINGLE_READY_TIMEOUT)?;
        s.wait_listening(LISTEN_TIMEOUT).await?;
        s.wait_jetstream_ready(s.ready_timeout).await?;
        Ok(s)
    }

    /// Writes `config` to [`CONFIG_FILE`] in `dir` and starts a server from
    /// it (log `nats-server.log` in `dir`); does not wait. `ready_timeout`
    /// bounds each restart's wait for JetStream.
    pub(crate) fn spawn(
        dir: &Path,
        config: &ServerConfig,
        ready_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let bin = find_nats_server()?;
        std::fs::create_dir_all(dir)?;
        let config_path = dir.join(CONFIG_FILE);
        std::fs::write(&config_path, config.text()?)
            .with_context(|| format!("write {}", config_path.display()))?;
        let mut args = vec!["-c".into(), config_path.display().to_string()];
        let mut program = bin.clone();
        if let Some(uid) = config.run_as {
            std::fs::create_dir_all(&config.store_dir)?;
            for d in [dir, config.store_dir.as_path()] {
                std::os::unix::fs::chown(d, Some(uid), Some(uid))
                    .with_context(|| format!("chown {} to {uid}", d.display()))?;
            }
            program = PathBuf::from(SETPRIV);
            let mut with = vec![
                "--reuid".to_owned(),
                uid.to_string(),
                "--regid".to_owned(),
                uid.to_string(),
                "--clear-groups".to_owned(),
                "--".to_owned(),
                bin.display().to_string(),
            ];
            with.append(&mut args);
            args = with;
        }
        let mut proc = Proc::new(
            &format!("nats-server {}", config.name),
            &program,
            args,
            vec![],
            dir.join("nats-server.log"),
        );
        proc.start()?;
        Ok(NatsServer {
            name: config.name.clone(),
            port: config.port,
            monitor_port: config.monitor_port,
            proc,
            config_path,
            ready_timeout,
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The monitoring endpoint's base URL (append `/varz`, `/healthz`, ...).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    fn listening(&mut self) -> anyhow::Result<bool> {
        if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            return Ok(true);
        }
        self.ensure_running()?;
        Ok(false)
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if !self.proc.is_running() {
            bail!("{} exited; log:\n{}", self.proc.name, self.proc.log());
        }
        Ok(())
    }

    /// Waits (asynchronously) until the server accepts connections on its
    /// client port.
    pub async fn wait_listening(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.listening()? {
                return Ok(());
            }
            tokio::time::sleep(LISTEN_POLL).await;
        }
        bail!(
            "nats-server not listening on {} after {timeout:?}",
            self.port
        )
    }

    /// Whether JetStream is ready: `/healthz?js-meta-only=true` answers 200
    /// once the server knows a meta leader (a single server: once
    /// JetStream runs). The answer's body when it is not.
    pub async fn jetstream_ready(&self) -> Result<(), String> {
        let url = format!("{}/healthz?js-meta-only=true", self.monitor_url());
        match twopc_common::http::http_get(&url, HEALTH_GET_TIMEOUT).await {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(format!("{status} {}", body.trim())),
            Err(e) => Err(format!("{e:#}")),
        }
    }

    /// Waits (asynchronously, polling its health endpoint) until JetStream
    /// is ready ([`NatsServer::jetstream_ready`]).
    pub async fn wait_jetstream_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.jetstream_ready().await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            self.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "{}: JetStream not ready after {timeout:?} (healthz: {last}); log:\n{}",
                    self.proc.name,
                    self.proc.log()
                );
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    /// The meta leader this server knows (`/jsz`: `meta_cluster.leader`);
    /// `None` when it knows none or is not clustered. After the leader dies
    /// the others keep naming it for a few seconds (see
    /// [`crate::NatsCluster::wait_ready`]).
    pub async fn meta_leader(&self) -> anyhow::Result<Option<String>> {
        let url = format!("{}/jsz", self.monitor_url());
        let (status, body) = twopc_common::http::http_get(&url, HEALTH_GET_TIMEOUT).await?;
        if status != 200 {
            bail!("GET {url}: {status} {body}");
        }
        let jsz: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("GET {url}: {body}"))?;
        Ok(jsz["meta_cluster"]["leader"].as_str().map(str::to_owned))
    }

    /// Kills (SIGKILL) and starts again on the same ports with the same
    /// store; waits (asynchronously) until the server listens and JetStream
    /// is ready (a cluster node: it is current with a meta leader).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill()?;
        self.proc.start()?;
        self.wait_listening(LISTEN_TIMEOUT).await?;
        self.wait_jetstream_ready(self.ready_timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(route_ports: Vec<u16>) -> ServerConfig {
        ServerConfig {
            run_as: None,
            auth: None,
            tls: None,
            name: "twopc-n0".into(),
            port: 14222,
            monitor_port: 18222,
            store_dir: "/data/we \"ird\\ $HOME #dir/n0/js".into(),
            cluster: Some(ClusterMembership {
                name: "twopc".into(),
                route_port: route_ports[0],
                route_ports,
            }),
        }
    }

    #[test]
    fn config_syncs_every_write_and_routes_to_every_node() {
        let text = node(vec![16001, 16002, 16003]).text().unwrap();
        assert!(text.contains("\n  sync_interval: always\n"), "{text}");
        assert!(text.contains("server_name: \"twopc-n0\"\n"), "{text}");
        assert!(text.contains("listen: \"127.0.0.1:14222\"\n"), "{text}");
        assert!(text.contains("http: \"127.0.0.1:18222\"\n"), "{text}");
        assert!(
            text.contains(
                "  routes: [\"nats-route://127.0.0.1:16001\", \
                 \"nats-route://127.0.0.1:16002\", \"nats-route://127.0.0.1:16003\"]\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  listen: \"127.0.0.1:16001\"\n"),
            "route listen: {text}"
        );
        // The path is quoted, `"` and `\` escaped.
        assert!(
            text.contains(r#"  store_dir: "/data/we \"ird\\ $HOME #dir/n0/js""#),
            "{text}"
        );
    }

    #[test]
    fn a_single_server_has_no_cluster_block_but_syncs_always() {
        let mut c = node(vec![1]);
        c.cluster = None;
        let text = c.text().unwrap();
        assert!(!text.contains("cluster"), "{text}");
        assert!(text.contains("sync_interval: always"), "{text}");
    }

    #[test]
    fn tls_is_required_of_clients_and_routes_with_quoted_paths() {
        let mut c = node(vec![16001, 16002, 16003]);
        c.tls = Some(ServerTls {
            cert: "/tls dir/server.pem".into(),
            key: "/tls dir/server-key.pem".into(),
            ca: "/tls dir/\"ca\".pem".into(),
            verify: true,
        });
        let text = c.text().unwrap();
        let client_block = "tls {\n  cert_file: \"/tls dir/server.pem\"\n  \
             key_file: \"/tls dir/server-key.pem\"\n  ca_file: \"/tls dir/\\\"ca\\\".pem\"\n  \
             verify: true\n  timeout: 2\n}\n";
        assert!(text.contains(&format!("\n{client_block}")), "{text}");
        // The same block, indented, inside the cluster block: routes too.
        let route_block: String = client_block.lines().map(|l| format!("  {l}\n")).collect();
        let cluster = &text[text.find("cluster {").expect("cluster block")..];
        assert!(cluster.contains(&route_block), "{text}");

        // Without mutual TLS clients need no certificate; routes still do.
        c.tls.as_mut().unwrap().verify = false;
        let text = c.text().unwrap();
        let (top, cluster) = text.split_at(text.find("cluster {").unwrap());
        assert!(top.contains("\n  verify: false\n"), "{text}");
        assert!(cluster.contains("\n    verify: true\n"), "{text}");

        c.tls = None;
        assert!(!c.text().unwrap().contains("tls"), "plain TCP by default");
    }

    #[test]
    fn control_characters_are_refused() {
        let mut c = node(vec![1]);
        c.store_dir = "/tmp/a\nb".into();
        assert!(c.text().is_err());
    }

    #[test]
    fn free_ports_are_distinct_and_avoid_the_taken_ones() {
        let taken = free_ports(2, &[]).unwrap();
        let ports = free_ports(9, &taken).unwrap();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 9);
        assert!(ports.iter().all(|p| !taken.contains(p)));
    }
}
