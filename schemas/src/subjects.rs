//! NATS subjects. Public subjects carry JSON; `twopc.` subjects carry the
//! internal postcard protocol.

use crate::client::ClientName;

/// Public: a purchase by `client` (JSON [`crate::api::PurchaseRequest`]),
/// served by the coordinator. Only the client's credentials may publish
/// it, so the token is the authenticated buyer: its `request_id`s are its
/// own namespace.
pub fn purchase(client: &ClientName) -> String {
    format!("shop.{client}.purchase")
}

/// Public: the status of one of `client`'s transactions (JSON
/// `{"tx": ...}`); another client's transaction is `not_found`.
pub fn client_tx(client: &ClientName) -> String {
    format!("shop.{client}.tx")
}

/// Every client's purchase subject (the coordinator's subscription).
pub fn purchase_any() -> String {
    "shop.*.purchase".to_owned()
}

/// Every client's transaction-status subject.
pub fn client_tx_any() -> String {
    "shop.*.tx".to_owned()
}

/// Admin: any transaction's status at the coordinator (JSON `{"tx": ...}`).
pub const TX_STATUS: &str = "shop.tx";
/// Admin: transactions not yet resolved at the coordinator (JSON `{}`).
pub const IN_DOUBT: &str = "shop.in_doubt";
/// Internal: participants ask the coordinator for a transaction's decision.
pub const DECISION_QUERY: &str = "twopc.decision";

/// Public: a user's balance (JSON `{"user": ...}`), served by the wallet.
pub const WALLET_BALANCE: &str = "wallet.balance";
/// Public: create a user with an opening balance, served by the wallet.
pub const WALLET_CREATE_USER: &str = "wallet.users.create";
/// Public: a product's price and stock (JSON `{"sku": ...}`), served by order.
pub const ORDER_STOCK: &str = "order.stock";
/// Public: create a product with price and stock, served by order.
pub const ORDER_CREATE_PRODUCT: &str = "order.products.create";

use crate::participant::ParticipantName;

/// Internal: phase 1 requests to one participant.
pub fn prepare(participant: &ParticipantName) -> String {
    format!("twopc.{participant}.prepare")
}

/// Internal: phase 2 (decision delivery) to one participant.
pub fn decide(participant: &ParticipantName) -> String {
    format!("twopc.{participant}.decide")
}

/// Public: a transaction's state at one participant (JSON `{"tx": ...}`).
pub fn participant_tx(participant: &ParticipantName) -> String {
    format!("{participant}.tx")
}

/// Public: a participant's prepared, undecided transactions (JSON `{}`).
pub fn participant_in_doubt(participant: &ParticipantName) -> String {
    format!("{participant}.in_doubt")
}

/// Queue group shared by all instances of one service, so each request is
/// handled once.
pub fn queue_group(service: &str) -> String {
    format!("twopc-{service}")
}

/// The JetStream KV bucket of the coordinators' decision log (a cluster's
/// `--store kv`); its stream is `KV_<bucket>`, its subjects `$KV.<bucket>.>`.
pub const DECISION_BUCKET: &str = "twopc_decisions";
