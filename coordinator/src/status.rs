//! The coordinator's status page (`--http-addr`): counters, recent
//! transactions, what is in doubt, and the participants' health. `GET /`
//! is HTML (refreshes every 2 s), `GET /status.json` the same as JSON.
//! A deliberately tiny HTTP/1.0 responder: one request per connection.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use twopc_schemas::api::{CoordinatorInDoubt, ParticipantInDoubt};
use twopc_schemas::subjects;

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
    user: String,
    sku: String,
    qty: u64,
    amount: u64,
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
    for name in subjects::PARTICIPANTS {
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
                        name: name.into(),
                        up: true,
                        prepared: Some(d.prepared.len()),
                        error: None,
                    });
                    participants_in_doubt.push(d);
                }
                Err(e) => participants.push(Participant {
                    name: name.into(),
                    up: true,
                    prepared: None,
                    error: Some(format!("bad reply: {e}")),
                }),
            },
            Err(e) => participants.push(Participant {
                name: name.into(),
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
            user: r
                .purchase
                .as_ref()
                .map(|p| p.user.clone())
                .unwrap_or_default(),
            sku: r
                .purchase
                .as_ref()
                .map(|p| p.sku.clone())
                .unwrap_or_default(),
            qty: r.purchase.as_ref().map_or(0, |p| p.qty),
            amount: r.purchase.as_ref().map_or(0, |p| p.amount),
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
    h.push_str("<h2>Recent transactions</h2><table id=\"recent\"><tr><th>tx</th><th>decision</th><th>user</th><th>sku</th><th>qty</th><th>amount</th><th>reason</th><th>delivered</th></tr>");
    for r in &s.recent {
        let class = if r.decision == "commit" { "ok" } else { "bad" };
        h.push_str(&format!(
            "<tr><td><code>{}</code></td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.tx),
            esc(&r.decision),
            esc(&r.user),
            esc(&r.sku),
            r.qty,
            r.amount,
            esc(&r.reason),
            if r.delivered { "yes" } else { "not yet" }
        ));
    }
    h.push_str("</table></body></html>");
    h
}

/// Serves the status page on `addr` until the process ends.
pub async fn serve_http<L: DecisionLog>(
    addr: SocketAddr,
    c: Arc<Coordinator<L>>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "status page at http://{addr}/");
    loop {
        let (mut sock, _) = tokio::select! {
            a = listener.accept() => a?,
            _ = twopc_common::serve::shutdown_begun() => return Ok(()),
        };
        let c = c.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status_line, ctype, body) = match path {
                "/" | "/index.html" => (
                    "200 OK",
                    "text/html; charset=utf-8",
                    html(&status(&c).await),
                ),
                "/status.json" => (
                    "200 OK",
                    "application/json",
                    serde_json::to_string(&status(&c).await).expect("serialises"),
                ),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let head = format!(
                "HTTP/1.0 {status_line}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
