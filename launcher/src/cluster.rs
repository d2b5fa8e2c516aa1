//! A JetStream cluster of nats-servers on loopback: each node a
//! [`NatsServer`] with its own folder, config file, store and ports, routes
//! to every node, `sync_interval: always`. The coordinators' replicated
//! decision log (a KV bucket with one replica per node) lives in it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::process::{free_ports, ClusterMembership, NatsServer, Proc, ServerConfig, ServerTls};

/// Fewest nodes: a quorum (2 of 3) survives one failure.
pub const MIN_CLUSTER_NODES: usize = 3;

/// Most nodes: a JetStream stream (a KV bucket) has at most 5 replicas, and
/// the decision log has one on every node.
pub const MAX_CLUSTER_NODES: usize = 5;

/// The cluster's name, in every node's config.
pub const CLUSTER_NAME: &str = "twopc";

/// Longest a start or a node's restart may take until every node started
/// knows a meta leader (measured here: about 2.5 s on a fresh store, about
/// 5 s for a node restarted while the others run).
pub const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a started node may take to listen on its client port.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a wait for the cluster's meta leader looks again.
const LEADER_POLL: Duration = Duration::from_millis(50);

/// A running cluster. Dropping it kills every node.
pub struct NatsCluster {
    /// The nodes, in the order of [`NatsCluster::urls`]; node `i`'s files
    /// are in `<dir>/node-<i>`.
    pub nodes: Vec<NatsServer>,
    /// Each node's route port.
    route_ports: Vec<u16>,
    /// Each node's user id, when started isolatable.
    uids: Option<Vec<u32>>,
    /// Nodes cut off from the others now, with the rules that do it.
    isolated: std::collections::BTreeMap<usize, Vec<Vec<String>>>,
}

/// User ids the nodes of an isolatable cluster run as (node `i`: base + i).
const ISOLATABLE_UID_BASE: u32 = 47_100;

impl NatsCluster {
    /// Whether `n` nodes make a sensible cluster: odd (an even one
    /// tolerates no more failures than one node fewer) and within
    /// [`MIN_CLUSTER_NODES`]..=[`MAX_CLUSTER_NODES`].
    pub fn check_size(n: usize) -> anyhow::Result<()> {
        let odd = n % 2 == 1;
        if !(MIN_CLUSTER_NODES..=MAX_CLUSTER_NODES).contains(&n) || !odd {
            bail!(
                "a cluster of {n} nats-servers is not supported: use an odd number from \
                 {MIN_CLUSTER_NODES} to {MAX_CLUSTER_NODES} (3 survives one failure; a KV \
                 bucket has at most 5 replicas)"
            );
        }
        Ok(())
    }

    /// Starts `n` nodes on free ports with their files in `dir/node-<i>`
    /// and waits (asynchronously) until every node knows a meta leader.
    pub async fn start(dir: &Path, n: usize) -> anyhow::Result<NatsCluster> {
        NatsCluster::start_at(dir, n, None).await
    }

    /// As [`NatsCluster::start`]; with `first_port`, node `i` listens for
    /// clients on `first_port + i` (monitoring and route ports are free
    /// ones).
    ///
    /// All nodes start at once: on a fresh store JetStream elects its first
    /// meta leader only once every configured peer is up (with two of three
    /// up, none was elected in over 70 s).
    pub async fn start_at(
        dir: &Path,
        n: usize,
        first_port: Option<u16>,
    ) -> anyhow::Result<NatsCluster> {
        Self::start_with(dir, n, first_port, false, None, None).await
    }

    /// As [`NatsCluster::start_at`]; `isolatable` runs each node as a user
    /// of its own, so that [`NatsCluster::isolate`] can cut it off from the
    /// others (needs [`NatsCluster::can_isolate`]); with `auth`, only its
    /// users may connect, with their permissions, and routes authenticate;
    /// with `tls`, clients and routes must speak TLS.
    pub async fn start_with(
        dir: &Path,
        n: usize,
        first_port: Option<u16>,
        isolatable: bool,
        auth: Option<crate::auth::Credentials>,
        tls: Option<ServerTls>,
    ) -> anyhow::Result<NatsCluster> {
        if isolatable {
            if let Err(why) = NatsCluster::can_isolate() {
                bail!("cannot start an isolatable cluster: {why}");
            }
        }
        let uids: Option<Vec<u32>> =
            isolatable.then(|| (0..n as u32).map(|i| ISOLATABLE_UID_BASE + i).collect());
        NatsCluster::check_size(n)?;
        let client_ports: Vec<u16> = match first_port {
            Some(p) => (0..n)
                .map(|i| {
                    u16::try_from(usize::from(p) + i)
                        .ok()
                        .filter(|&port| port != 0)
                        .with_context(|| format!("client ports {p}+{i} past 65535"))
                })
                .collect::<anyhow::Result<_>>()?,
            None => free_ports(n, &[])?,
        };
        let mut others = free_ports(2 * n, &client_ports)?;
        let route_ports = others.split_off(n);
        let monitor_ports = others;
        let mut nodes = vec![];
        for i in 0..n {
            let node_dir = dir.join(format!("node-{i}"));
            let config = ServerConfig {
                name: format!("twopc-n{i}-{}", client_ports[i]),
                port: client_ports[i],
                monitor_port: monitor_ports[i],
                store_dir: node_dir.join("js"),
                cluster: Some(ClusterMembership {
                    name: CLUSTER_NAME.into(),
                    route_port: route_ports[i],
                    route_ports: route_ports.clone(),
                }),
                run_as: uids.as_ref().map(|u| u[i]),
                auth: auth.clone(),
                tls: tls.clone(),
            };
            nodes.push(NatsServer::spawn(
                &node_dir,
                &config,
                CLUSTER_READY_TIMEOUT,
            )?);
        }
        let mut cluster = NatsCluster {
            nodes,
            route_ports,
            uids,
            isolated: Default::default(),
        };
        for node in &mut cluster.nodes {
            node.wait_listening(LISTEN_TIMEOUT).await?;
        }
        cluster.wait_ready(CLUSTER_READY_TIMEOUT).await?;
        Ok(cluster)
    }

    /// Whether nodes can be isolated here: root, `setpriv` and a working
    /// `iptables` (the rules match the sending user of loopback packets).
    pub fn can_isolate() -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        if !Path::new(crate::process::SETPRIV).is_file() {
            return Err(format!("{} missing", crate::process::SETPRIV));
        }
        match std::process::Command::new("iptables")
            .args(["-w", "-n", "-L", "OUTPUT"])
            .output()
        {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "iptables refuses: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("no iptables: {e}")),
        }
    }

    /// The iptables rules that cut node `i` off from the other nodes: its
    /// route packets to them, its answers on routes they opened, and theirs
    /// to its route port are dropped. Clients keep reaching it (a node
    /// partitioned from its peers, not from its clients).
    fn isolation_rules(&self, i: usize) -> anyhow::Result<Vec<Vec<String>>> {
        let uids = self
            .uids
            .as_ref()
            .context("this cluster was not started isolatable")?;
        let rule = |uid: u32, port_match: &[&str]| -> Vec<String> {
            let mut r: Vec<String> = [
                "OUTPUT",
                "-o",
                "lo",
                "-p",
                "tcp",
                "-m",
                "owner",
                "--uid-owner",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            r.push(uid.to_string());
            r.extend(port_match.iter().map(|s| s.to_string()));
            r.extend(["-j", "DROP"].iter().map(|s| s.to_string()));
            r
        };
        let mut rules = vec![];
        let ri = self.route_ports[i].to_string();
        rules.push(rule(uids[i], &["--sport", &ri]));
        for j in (0..self.nodes.len()).filter(|&j| j != i) {
            let rj = self.route_ports[j].to_string();
            rules.push(rule(uids[i], &["--dport", &rj]));
            rules.push(rule(uids[j], &["--dport", &ri]));
        }
        Ok(rules)
    }

    fn iptables(action: &str, rule: &[String]) -> anyhow::Result<()> {
        let out = std::process::Command::new("iptables")
            .arg("-w")
            .arg(action)
            .args(rule)
            .output()
            .context("run iptables")?;
        if !out.status.success() {
            bail!(
                "iptables {action} {}: {}",
                rule.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Cuts node `i` off from the other nodes (it keeps running and keeps
    /// its clients); [`NatsCluster::reconnect`] undoes it.
    pub fn isolate(&mut self, i: usize) -> anyhow::Result<()> {
        if self.isolated.contains_key(&i) {
            return Ok(());
        }
        let rules = self.isolation_rules(i)?;
        for r in &rules {
            Self::iptables("-I", r)?;
        }
        self.isolated.insert(i, rules);
        Ok(())
    }

    /// Ends node `i`'s isolation.
    pub fn reconnect(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(rules) = self.isolated.remove(&i) {
            for r in &rules {
                Self::iptables("-D", r)?;
            }
        }
        Ok(())
    }

    /// Ends every isolation.
    pub fn reconnect_all(&mut self) {
        let isolated: Vec<usize> = self.isolated.keys().copied().collect();
        for i in isolated {
            let _ = self.reconnect(i);
        }
    }

    /// Whether node `i` is cut off now.
    pub fn is_isolated(&self, i: usize) -> bool {
        self.isolated.contains_key(&i)
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// The client URLs comma-separated, as `NATS_URL` takes them.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// Every node's monitoring URL.
    pub fn monitor_urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::monitor_url).collect()
    }

    /// Node `i`.
    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// Node `i`'s process (pause, resume, signals).
    pub fn proc(&mut self, i: usize) -> &mut Proc {
        &mut self.nodes[i].proc
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].proc.kill()
    }

    /// Starts node `i` again (killing it first if it runs) on the same
    /// ports with the same store; waits (asynchronously) until it listens
    /// and the cluster is ready again ([`NatsCluster::wait_ready`]), at most
    /// [`CLUSTER_READY_TIMEOUT`] each.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i]
            .restart()
            .await
            .with_context(|| format!("restarting cluster node {i}"))?;
        self.wait_ready(CLUSTER_READY_TIMEOUT).await
    }

    /// The meta leader every running node agrees on, if it is one of the
    /// running nodes and every running node's JetStream is current with it;
    /// otherwise why not.
    pub async fn live_leader(&mut self) -> Result<String, String> {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].proc.is_running())
            .collect();
        if running.is_empty() {
            return Err("no node runs".into());
        }
        let mut agreed: Option<String> = None;
        for &i in &running {
            let node = &self.nodes[i];
            node.jetstream_ready()
                .await
                .map_err(|why| format!("node {i}: {why}"))?;
            let leader = node
                .meta_leader()
                .await
                .map_err(|e| format!("node {i}: {e:#}"))?
                .ok_or_else(|| format!("node {i} knows no meta leader"))?;
            if !running.iter().any(|&j| self.nodes[j].name == leader) {
                return Err(format!("node {i} names {leader}, which does not run"));
            }
            match &agreed {
                Some(a) if *a != leader => {
                    return Err(format!("node {i} names {leader}, another {a}"));
                }
                _ => agreed = Some(leader),
            }
        }
        Ok(agreed.expect("a node runs"))
    }

    /// Waits (asynchronously, polling the nodes' monitoring endpoints)
    /// until the running nodes agree on a meta leader that runs and are
    /// current with it ([`NatsCluster::live_leader`]); at most `timeout`.
    ///
    /// `/healthz?js-meta-only=true` alone is not enough after a kill: the
    /// others keep answering 200 and naming the dead leader for about 2 s,
    /// then 503 until they elect a new one (about 8 s after the kill, here).
    /// A paused node runs but never answers: this then times out.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let why = match self.live_leader().await {
                Ok(_) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                let logs: String = self
                    .nodes
                    .iter()
                    .map(|n| format!("===== {}\n{}", n.name, tail(&n.proc.log(), 20)))
                    .collect();
                bail!("cluster not ready after {timeout:?}: {why}\n{logs}");
            }
            tokio::time::sleep(LEADER_POLL).await;
        }
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    out
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        // Never leave a rule behind.
        self.reconnect_all();
    }
}
