//! A minimal HTTP/1.0 GET over TCP for reading a local server's monitoring
//! endpoints (nats-server's `/varz`, `/healthz`): no client stack for one
//! loopback request.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest response read.
const MAX_RESPONSE_BYTES: u64 = 4 * 1024 * 1024;

/// GETs `url` (`http://host:port/path?query`); returns the status and body.
pub async fn get(url: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(timeout, get_unbounded(url))
        .await
        .with_context(|| format!("GET {url}: no answer within {timeout:?}"))?
}

async fn get_unbounded(url: &str) -> anyhow::Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("GET {url}: connect"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut raw)
        .await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {url}: no end of headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(s) => Ok((s, body.to_owned())),
        None => bail!("GET {url}: bad status line {:?}", head.lines().next()),
    }
}
