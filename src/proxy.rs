//! A TCP proxy between one service and nats-server, so a test can take that
//! service's link down and bring it back: every connection is cut and new
//! ones are refused until the link is up again. Loopback only.

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The state of a proxied link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow.
    Up,
    /// Existing connections are closed, new ones refused (a link taken
    /// down: the service sees connection resets and reconnects later).
    Cut,
}

pub struct Proxy {
    /// The port the service connects to.
    pub port: u16,
    /// The link state every connection task watches.
    state: Arc<watch::Sender<Link>>,
    /// The accept loop; aborted on drop.
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream_port`.
    pub async fn start(upstream_port: u16) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (tx, _) = watch::channel(Link::Up);
        let state = Arc::new(tx);
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *st.borrow() == Link::Cut {
                    drop(inbound);
                    continue;
                }
                let rx = st.subscribe();
                tokio::spawn(forward(inbound, upstream_port, rx));
            }
        });
        Ok(Proxy { port, state, task })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, link: Link) {
        self.state.send_replace(link);
    }

    pub fn link(&self) -> Link {
        *self.state.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(mut inbound: TcpStream, upstream_port: u16, mut state: watch::Receiver<Link>) {
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream) => {}
        _ = state.wait_for(|l| *l == Link::Cut) => {}
    }
    // Dropping both sockets closes the connection on each side.
}
