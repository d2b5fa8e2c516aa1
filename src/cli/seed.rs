//! Creating users and products through the public create requests: `twopc
//! seed FILE` and the demo data of `twopc up`.

use std::time::Duration;

use anyhow::bail;
use serde::Deserialize;
use twopc_launcher::client::{request, Reply};
use twopc_schemas::api::{Balance, CreateProduct, CreateUser, Stock};
use twopc_schemas::{subjects, Code};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SeedFile {
    #[serde(default)]
    pub users: Vec<CreateUser>,
    #[serde(default)]
    pub products: Vec<CreateProduct>,
}

pub fn demo() -> SeedFile {
    SeedFile {
        users: vec![
            CreateUser {
                user: "alice".into(),
                balance: 10_000,
            },
            CreateUser {
                user: "bob".into(),
                balance: 5_000,
            },
            CreateUser {
                user: "carol".into(),
                balance: 500,
            },
        ],
        products: vec![
            CreateProduct {
                sku: "book-1".into(),
                price: 1_250,
                stock: 10,
            },
            CreateProduct {
                sku: "pen-1".into(),
                price: 199,
                stock: 100,
            },
            CreateProduct {
                sku: "lamp-1".into(),
                price: 4_500,
                stock: 2,
            },
        ],
    }
}

pub async fn seed(
    client: &async_nats::Client,
    seed: &SeedFile,
    timeout: Duration,
) -> anyhow::Result<()> {
    for u in &seed.users {
        match request::<_, Balance>(client, subjects::WALLET_CREATE_USER, u, timeout).await? {
            Reply::Ok(b) => println!("user {} created with balance {}", b.user, b.balance),
            Reply::Err(e) if e.error.code == Code::AlreadyExists => {
                println!("user {} exists", u.user)
            }
            Reply::Err(e) => bail!("creating user {}: {}", u.user, e.error.message),
        }
    }
    for p in &seed.products {
        match request::<_, Stock>(client, subjects::ORDER_CREATE_PRODUCT, p, timeout).await? {
            Reply::Ok(s) => println!(
                "product {} created: price {}, stock {}",
                s.sku, s.price, s.stock
            ),
            Reply::Err(e) if e.error.code == Code::AlreadyExists => {
                println!("product {} exists", p.sku)
            }
            Reply::Err(e) => bail!("creating product {}: {}", p.sku, e.error.message),
        }
    }
    Ok(())
}

/// `twopc seed FILE`.
pub async fn from_file(
    client: &async_nats::Client,
    file: &std::path::Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let s: SeedFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    seed(client, &s, timeout).await
}
