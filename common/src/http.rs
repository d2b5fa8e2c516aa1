//! The smallest HTTP client that reads nats-server's monitoring endpoints
//! (`/healthz`, `/varz`, `/jsz`): one HTTP/1.0 GET over a plain TCP
//! connection, the whole answer read until the server closes it. HTTP/1.0
//! keeps it simple: the server sends no chunked encoding and closes the
//! connection after the body. Not a general client: `http://` only, no
//! redirects, no TLS.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most bytes of an answer read (status line, headers and body); `/varz`
/// is about 3 KiB, `/jsz` of a small cluster a few KiB.
pub const MAX_RESPONSE_BYTES: u64 = 4 << 20;

/// GETs `url` (`http://host:port/path?query`) and returns the status code
/// and the body; the connect, the request and the whole answer together
/// take at most `timeout`.
pub async fn http_get(url: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let (authority, path) = split_url(url)?;
    let exchange = async {
        let mut stream = TcpStream::connect(authority)
            .await
            .with_context(|| format!("connect to {authority}"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE_BYTES + 1)
            .read_to_end(&mut raw)
            .await?;
        if raw.len() as u64 > MAX_RESPONSE_BYTES {
            bail!("answer longer than {MAX_RESPONSE_BYTES} bytes");
        }
        parse_response(&raw)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("GET {url}: no complete answer within {timeout:?}"))?
        .with_context(|| format!("GET {url}"))
}

/// `http://host:port/path?q` → (`host:port`, `/path?q`).
fn split_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() || !authority.contains(':') {
        bail!("URL without host:port: {url:?}");
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("URL path with spaces or control characters: {url:?}");
    }
    Ok((authority, path))
}

/// The status code and body of a raw HTTP/1.x answer.
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("answer without the blank line after its headers")?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 status line: {status_line:?}");
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("no status code in {status_line:?}"))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn splits_authority_and_path() {
        assert_eq!(
            split_url("http://127.0.0.1:8222/healthz?js-meta-only=true").unwrap(),
            ("127.0.0.1:8222", "/healthz?js-meta-only=true")
        );
        assert_eq!(
            split_url("http://127.0.0.1:8222").unwrap(),
            ("127.0.0.1:8222", "/")
        );
        assert!(split_url("https://127.0.0.1:8222/").is_err());
        assert!(split_url("http://localhost/varz").is_err(), "no port");
        assert!(split_url("http://127.0.0.1:1/a b").is_err());
    }

    #[test]
    fn parses_status_and_body() {
        let raw = b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n\r\n{\"status\":\"unavailable\"}";
        assert_eq!(
            parse_response(raw).unwrap(),
            (503, "{\"status\":\"unavailable\"}".to_owned())
        );
        assert!(parse_response(b"HTTP/1.0 200 OK\r\n").is_err(), "no body");
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n").is_err());
    }

    /// One connection answered with `answer`, after reading the request.
    async fn serve_once(answer: &'static [u8]) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/varz", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let n = sock.read(&mut request).await.unwrap();
            sock.write_all(answer).await.unwrap();
            String::from_utf8_lossy(&request[..n]).into_owned()
        });
        (url, task)
    }

    #[tokio::test]
    async fn gets_over_tcp_until_the_server_closes() {
        let (url, server) = serve_once(b"HTTP/1.0 200 OK\r\n\r\n{\"ok\":true}").await;
        let (status, body) = http_get(&url, Duration::from_secs(5)).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "{\"ok\":true}"));
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /varz HTTP/1.0\r\nHost: 127.0.0.1:"));
    }

    #[tokio::test]
    async fn a_server_that_never_closes_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        // Accepted (by the kernel's backlog) but never answered.
        let err = http_get(&url, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("no complete answer"), "{err:#}");
        drop(listener);
    }
}
