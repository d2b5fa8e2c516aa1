//! A TCP proxy between one service and nats-server, so a test can take that
//! service's link down and bring it back: every connection is cut and new
//! ones are refused until the link is up again; or stall it one way, so the
//! service still receives but nothing it sends gets through. Loopback only.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Receive buffer of the proxy's sockets towards the service.
const SERVICE_SIDE_RECV_BUFFER_BYTES: u32 = 16 * 1024;

/// The state of a proxied link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow.
    Up,
    /// Existing connections are closed, new ones refused (a link taken
    /// down: the service sees connection resets and reconnects later).
    Cut,
    /// The connection stays open and the service keeps receiving, but the
    /// proxy stops reading what the service sends (a congested or half-dead
    /// link: the service's socket and then its client's queue fill up).
    /// What was held back flows again when the link is `Up`.
    Stalled,
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
        // A small receive buffer on the service side (accepted sockets
        // inherit it), so that a stalled link backs up into the service
        // within a few dozen messages, as a congested link would, instead
        // of into megabytes of loopback buffers. While the link is up the
        // proxy reads at once, so throughput does not suffer.
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(SERVICE_SIDE_RECV_BUFFER_BYTES)?;
        socket.bind("127.0.0.1:0".parse().expect("loopback address"))?;
        let listener = socket.listen(1024)?;
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

async fn forward(inbound: TcpStream, upstream_port: u16, mut state: watch::Receiver<Link>) {
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut from_service, mut to_service) = inbound.into_split();
    let (mut from_server, mut to_server) = upstream.into_split();
    let downstream = tokio::io::copy(&mut from_server, &mut to_service);
    let upstream_state = state.clone();
    let upstream = async move {
        let mut state = upstream_state;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // While stalled, nothing is read from the service: its writes
            // back up in the kernel and then in its own client.
            if state.wait_for(|l| *l != Link::Stalled).await.is_err() {
                return;
            }
            let n = tokio::select! {
                r = from_service.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                _ = state.wait_for(|l| *l == Link::Stalled) => continue,
            };
            if to_server.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = downstream => {}
        _ = upstream => {}
        _ = state.wait_for(|l| *l == Link::Cut) => {}
    }
    // Dropping both sockets closes the connection on each side.
}
