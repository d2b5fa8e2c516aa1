//! The request commands: one public request (or a few) and the reply
//! printed as JSON.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use twopc_client::{ClientError, Submitted, TxClient};
use twopc_launcher::client::{request, request_raw, Reply, Shop};
use twopc_schemas::api::{
    CreateProduct, CreateUser, ErrorReply, PurchaseRequest, Stock, StockQuery,
};
use twopc_schemas::tx::TxSubmit;
use twopc_schemas::ClientName;
use twopc_schemas::{participant, subjects};

use super::{print_json, print_reply};

/// Buys `qty` of `sku`; the amount defaults to the listed price × qty.
pub async fn purchase(
    shop: &Shop,
    timeout: Duration,
    user: String,
    sku: String,
    qty: u64,
    amount: Option<u64>,
    request_id: Option<String>,
) -> anyhow::Result<()> {
    let amount = match amount {
        Some(a) => a,
        None => match request::<_, Stock>(
            &shop.client,
            subjects::ORDER_STOCK,
            &StockQuery { sku: sku.clone() },
            timeout,
        )
        .await?
        {
            Reply::Ok(s) => s.price.checked_mul(qty).context("amount overflows")?,
            Reply::Err(e) => return print_reply::<Value>(Reply::Err(e)),
        },
    };
    // Without a request id of its own, one of ours: the client library
    // retries with it, and the user can ask again with it (the same command
    // with --request-id) or read the transaction back on its own subject.
    let request_id = request_id.unwrap_or_else(|| format!("cli-{}", uuid::Uuid::now_v7()));
    let req = PurchaseRequest {
        user,
        sku,
        qty,
        amount,
        request_id: Some(request_id),
    };
    let client = TxClient::new(shop.client.clone(), shop.name.clone())
        .with_deadline(timeout, Duration::from_secs(5));
    print_submitted(client.purchase(req).await)
}

/// Submits a transaction given as its JSON (`shop.<client>.transaction`).
pub async fn transaction(
    nats: async_nats::Client,
    name: ClientName,
    timeout: Duration,
    json: String,
) -> anyhow::Result<()> {
    let req = TxSubmit::parse(json.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = TxClient::new(nats, name).with_deadline(timeout, Duration::from_secs(5));
    print_submitted(client.submit(req.branches, req.request_id).await)
}

fn print_submitted(r: Result<Submitted, ClientError>) -> anyhow::Result<()> {
    match r {
        Ok(Submitted::Decided(reply)) => {
            print_json(&reply);
            Ok(())
        }
        Err(ClientError::Refused(e)) => print_reply::<Value>(Reply::Err(ErrorReply { error: e })),
        Err(ClientError::Unknown {
            request_id, last, ..
        }) => bail!(
            "no answer in time ({last}): the transaction may or may not have happened; \
             send it again with request id {request_id} (--request-id), or check `twopc tx`"
        ),
        Err(e) => bail!("{e}"),
    }
}

pub async fn balance(
    client: &async_nats::Client,
    timeout: Duration,
    user: String,
) -> anyhow::Result<()> {
    print_reply(
        request::<_, Value>(
            client,
            subjects::WALLET_BALANCE,
            &serde_json::json!({ "user": user }),
            timeout,
        )
        .await?,
    )
}

pub async fn stock(
    client: &async_nats::Client,
    timeout: Duration,
    sku: String,
) -> anyhow::Result<()> {
    print_reply(
        request::<_, Value>(
            client,
            subjects::ORDER_STOCK,
            &serde_json::json!({ "sku": sku }),
            timeout,
        )
        .await?,
    )
}

/// A transaction's story: the coordinator's record and each participant's.
/// A transaction's story: the coordinator's record, then each participant
/// it names (the wallet and the order service when it names none: a
/// presumed abort, or no record).
pub async fn tx(client: &async_nats::Client, timeout: Duration, id: String) -> anyhow::Result<()> {
    let body = serde_json::to_vec(&serde_json::json!({ "tx": id }))?;
    let coordinator = [("coordinator", subjects::TX_STATUS.to_owned())];
    let mut all = ask_each(client, &coordinator, body.clone(), timeout).await;
    let mut names: Vec<String> = all["coordinator"]["branches"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .filter_map(|b| b["participant"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names = participant::PURCHASE_PARTICIPANTS
            .iter()
            .map(|p| p.to_string())
            .collect();
    }
    let mut parts = vec![];
    for n in &names {
        let p = twopc_schemas::ParticipantName::new(n.as_str())?;
        parts.push((n.as_str(), subjects::participant_tx(&p)));
    }
    all.extend(ask_each(client, &parts, body, timeout).await);
    print_json(&all);
    Ok(())
}

pub async fn in_doubt(client: &async_nats::Client, timeout: Duration) -> anyhow::Result<()> {
    let parts = [
        ("coordinator", subjects::IN_DOUBT.to_owned()),
        (
            "wallet",
            subjects::participant_in_doubt(&participant::WALLET),
        ),
        ("order", subjects::participant_in_doubt(&participant::ORDER)),
    ];
    print_json(&ask_each(client, &parts, b"{}".to_vec(), timeout).await);
    Ok(())
}

/// Who owns each participant name: its lease (store, epoch, the live
/// owner or none), read from the owners bucket.
pub async fn owners(client: &async_nats::Client) -> anyhow::Result<()> {
    let mut out = serde_json::Map::new();
    for p in participant::PURCHASE_PARTICIPANTS {
        let v = match twopc_participant::ownership::read_lease(client, &p).await {
            Ok(Some((lease, revision))) => {
                let mut v = serde_json::to_value(&lease)?;
                v["revision"] = revision.into();
                v
            }
            Ok(None) => serde_json::json!({"owner": null, "never_owned": true}),
            Err(e) => serde_json::json!({"error": format!("{e:#}")}),
        };
        out.insert(p.to_string(), v);
    }
    print_json(&Value::Object(out));
    Ok(())
}

/// Succeeds if the named service answers `$SRV.PING.<service>`.
pub async fn ping(
    client: &async_nats::Client,
    timeout: Duration,
    service: String,
) -> anyhow::Result<()> {
    let raw = request_raw(
        client,
        &twopc_common::micro::ping_subject(&service),
        vec![],
        timeout,
    )
    .await?;
    let v: Value = serde_json::from_slice(&raw).context("ping reply is not JSON")?;
    println!(
        "{} {} is up",
        v["name"].as_str().unwrap_or("?"),
        v["id"].as_str().unwrap_or("?")
    );
    Ok(())
}

pub async fn create_user(
    client: &async_nats::Client,
    timeout: Duration,
    user: String,
    balance: u64,
) -> anyhow::Result<()> {
    print_reply(
        request::<_, Value>(
            client,
            subjects::WALLET_CREATE_USER,
            &CreateUser { user, balance },
            timeout,
        )
        .await?,
    )
}

pub async fn create_product(
    client: &async_nats::Client,
    timeout: Duration,
    sku: String,
    price: u64,
    stock: u64,
) -> anyhow::Result<()> {
    print_reply(
        request::<_, Value>(
            client,
            subjects::ORDER_CREATE_PRODUCT,
            &CreateProduct { sku, price, stock },
            timeout,
        )
        .await?,
    )
}

/// Sends `body` to each subject and collects the JSON replies by label; an
/// unreachable service shows as `{"unreachable": ...}`.
async fn ask_each(
    client: &async_nats::Client,
    parts: &[(&str, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> serde_json::Map<String, Value> {
    let mut all = serde_json::Map::new();
    for (label, subject) in parts {
        let v = match request_raw(client, subject, body.clone(), timeout).await {
            Ok(raw) => serde_json::from_slice(&raw)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into())),
            Err(e) => serde_json::json!({ "unreachable": format!("{e:#}") }),
        };
        all.insert((*label).into(), v);
    }
    all
}
