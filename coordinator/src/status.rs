//! The coordinator's status page (`--http-addr`): counters, recent
//! transactions, what is in doubt, and the participants' health. `GET /`
//! is HTML (refreshes every 2 s), `GET /status.json` the same as JSON.
//! Served over HTTP/1.1 by hyper, with a cap on connections and time
//! limits on each.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::sync::Semaphore;
use twopc_schemas::api::{CoordinatorInDoubt, ParticipantInDoubt};
use twopc_schemas::{participant, subjects};

use crate::coordinator::Coordinator;
use crate::log::DecisionLog;

#[derive(Debug, Serialize)]
struct Participant {
    name: String,
    up: bool,
    prepared: Option<usize>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct RecentTx {
    tx: String,
    decision: String,
    client: String,
    /// Each branch as `participant op`.
    branches: Vec<String>,
    reason: String,
    decided_at_ms: i64,
    delivered: bool,
}

#[derive(Debug, Serialize)]
struct Status {
    begun: u64,
    committed: u64,
    aborted: u64,
    coordinator: Option<CoordinatorInDoubt>,
    participants: Vec<Participant>,
    participants_in_doubt: Vec<ParticipantInDoubt>,
    recent: Vec<RecentTx>,
}

async fn status<L: DecisionLog>(c: &Coordinator<L>) -> Status {
    let mut participants = vec![];
    let mut participants_in_doubt = vec![];
    for name in &participant::PURCHASE_PARTICIPANTS {
        let req = async_nats::Request::new().payload(b"{}".to_vec().into());
        match twopc_common::nats::request(
            c.client(),
            subjects::participant_in_doubt(name),
            req,
            Duration::from_millis(500),
        )
        .await
        {
            Ok(m) => match serde_json::from_slice::<ParticipantInDoubt>(&m.payload) {
                Ok(d) => {
                    participants.push(Participant {
                        name: name.to_string(),
                        up: true,
                        prepared: Some(d.prepared.len()),
                        error: None,
                    });
                    participants_in_doubt.push(d);
                }
                Err(e) => participants.push(Participant {
                    name: name.to_string(),
                    up: true,
                    prepared: None,
                    error: Some(format!("bad reply: {e}")),
                }),
            },
            Err(e) => participants.push(Participant {
                name: name.to_string(),
                up: false,
                prepared: None,
                error: Some(e.to_string()),
            }),
        }
    }
    let recent = c
        .log()
        .recent(20)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| RecentTx {
            tx: r.tx.to_string(),
            decision: r.decision.as_str().into(),
            client: r
                .transaction
                .as_ref()
                .map(|t| t.client.to_string())
                .unwrap_or_default(),
            branches: r
                .transaction
                .as_ref()
                .map(|t| {
                    t.branches
                        .iter()
                        .map(|b| format!("{} {}", b.participant, b.op))
                        .collect()
                })
                .unwrap_or_default(),
            reason: r
                .reason
                .as_ref()
                .map(|x| x.code.as_str().to_owned())
                .unwrap_or_default(),
            decided_at_ms: r.decided_at_ms,
            delivered: r.pending.is_empty(),
        })
        .collect();
    Status {
        begun: c.counts.begun.load(Ordering::Relaxed),
        committed: c.counts.committed.load(Ordering::Relaxed),
        aborted: c.counts.aborted.load(Ordering::Relaxed),
        coordinator: c.in_doubt().await.ok(),
        participants,
        participants_in_doubt,
        recent,
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html(s: &Status) -> String {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>twopc coordinator</title><style>\
         body{font-family:sans-serif;margin:2em;color:#222}h1{margin-bottom:.2em}\
         .cards{display:flex;gap:1em;margin:1em 0}.card{border:1px solid #ccc;border-radius:8px;padding:1em 1.5em;min-width:8em}\
         .card b{display:block;font-size:2em}.ok{color:#17803d}.bad{color:#b91c1c}\
         table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border-bottom:1px solid #ddd;padding:.3em .8em;text-align:left;font-size:.9em}\
         code{font-size:.85em}</style></head><body><h1>twopc coordinator</h1>",
    );
    let (in_progress, undelivered) = s
        .coordinator
        .as_ref()
        .map_or((0, 0), |c| (c.in_progress.len(), c.undelivered.len()));
    h.push_str("<div class=\"cards\">");
    for (label, v) in [
        ("begun", s.begun as usize),
        ("committed", s.committed as usize),
        ("aborted", s.aborted as usize),
        ("in progress", in_progress),
        ("undelivered", undelivered),
    ] {
        h.push_str(&format!(
            "<div class=\"card\" id=\"{}\"><b>{v}</b>{label}</div>",
            label.replace(' ', "-")
        ));
    }
    h.push_str("</div><h2>Participants</h2><table><tr><th>participant</th><th>health</th><th>prepared (in doubt)</th></tr>");
    for p in &s.participants {
        let health = if p.up {
            "<span class=\"ok\">up</span>".to_string()
        } else {
            format!(
                "<span class=\"bad\">unreachable</span> {}",
                esc(p.error.as_deref().unwrap_or(""))
            )
        };
        h.push_str(&format!(
            "<tr><td>{}</td><td>{health}</td><td>{}</td></tr>",
            esc(&p.name),
            p.prepared.map_or("?".into(), |n| n.to_string())
        ));
    }
    h.push_str("</table><h2>In doubt</h2>");
    let mut rows = vec![];
    if let Some(c) = &s.coordinator {
        rows.extend(c.in_progress.iter().map(|t| {
            format!(
                "<tr><td><code>{}</code></td><td>coordinator</td><td>phase 1</td></tr>",
                esc(t)
            )
        }));
        rows.extend(c.undelivered.iter().map(|u| {
            let refused: String = u
                .refused_by
                .iter()
                .map(|r| format!("; refused by {} ({} ×{})", r.participant, r.code, r.times))
                .collect();
            format!(
                "<tr><td><code>{}</code></td><td>coordinator</td><td>{} not acknowledged by {}{}</td></tr>",
                esc(&u.tx),
                esc(&u.decision),
                esc(&u.pending.join(", ")),
                esc(&refused)
            )
        }));
    }
    for p in &s.participants_in_doubt {
        rows.extend(p.prepared.iter().map(|b| {
            format!(
                "<tr><td><code>{}</code></td><td>{}</td><td>prepared</td></tr>",
                esc(&b.tx),
                esc(&p.participant)
            )
        }));
    }
    if rows.is_empty() {
        h.push_str("<p id=\"nothing-in-doubt\">Nothing in doubt.</p>");
    } else {
        h.push_str("<table><tr><th>tx</th><th>where</th><th>state</th></tr>");
        h.push_str(&rows.join(""));
        h.push_str("</table>");
    }
    h.push_str("<h2>Recent transactions</h2><table id=\"recent\"><tr><th>tx</th><th>decision</th><th>client</th><th>branches</th><th>reason</th><th>delivered</th></tr>");
    for r in &s.recent {
        let class = if r.decision == "commit" { "ok" } else { "bad" };
        h.push_str(&format!(
            "<tr><td><code>{}</code></td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.tx),
            esc(&r.decision),
            esc(&r.client),
            esc(&r.branches.join("; ")),
            esc(&r.reason),
            if r.delivered { "yes" } else { "not yet" }
        ));
    }
    h.push_str("</table></body></html>");
    h
}

/// Most status-page connections served at once. Further ones wait in the
/// listen backlog until one closes: a crowd of browsers (or a flood)
/// cannot make the coordinator spawn without bound.
pub const MAX_CONNECTIONS: usize = 32;
/// A client must send a request's headers within this time, and an idle
/// keep-alive connection is closed after it.
pub const HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// Longest a connection lives, however it is used: a client that never
/// reads its response cannot hold one of the [`MAX_CONNECTIONS`] forever.
pub const CONNECTION_TIMEOUT_MS: u64 = 60_000;

/// Answers one request: `/` (or `/index.html`) as HTML, `/status.json` as
/// JSON, anything else 404; only GET and HEAD.
async fn respond<L: DecisionLog>(
    c: &Coordinator<L>,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n".into(),
        );
    }
    match req.uri().path() {
        "/" | "/index.html" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            html(&status(c).await),
        ),
        "/status.json" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string(&status(c).await).expect("serialises"),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves the status page on `addr` until shutdown begins.
pub async fn serve_http<L: DecisionLog>(
    addr: SocketAddr,
    c: Arc<Coordinator<L>>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "status page at http://{addr}/");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Take a slot before accepting, so that at most MAX_CONNECTIONS are
        // ever open; the permit is released when the connection ends.
        let (permit, (sock, _)) = tokio::select! {
            p = slots.clone().acquire_owned() => {
                let permit = p.expect("the semaphore is never closed");
                tokio::select! {
                    a = listener.accept() => (permit, a?),
                    _ = c.shutdown().begun() => return Ok(()),
                }
            }
            _ = c.shutdown().begun() => return Ok(()),
        };
        let c = c.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let c = c.clone();
                async move { Ok::<_, Infallible>(respond(&c, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS))
                .serve_connection(TokioIo::new(sock), service);
            match tokio::time::timeout(Duration::from_millis(CONNECTION_TIMEOUT_MS), conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "status page connection ended"),
                Err(_) => tracing::debug!(
                    "status page connection closed after {CONNECTION_TIMEOUT_MS} ms"
                ),
            }
        });
    }
}
