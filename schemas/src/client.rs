//! Shop clients: who buys. Each client has its own subjects,
//! `shop.<client>.purchase` and `shop.<client>.tx`, which only its
//! credentials may publish (the server's permissions), so the subject's
//! client token is the authenticated sender: request ids are scoped to it,
//! and a client reads only its own transactions.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::participant::ParticipantName;

/// The client `twopc up` and `twopc auth init` make credentials for.
pub const DEFAULT_CLIENT: &str = "web";

/// Names no client may take: the roles' own identities.
pub const RESERVED: [&str; 2] = ["admin", "coordinator"];

/// A shop client's name: one NATS subject token under the same rule as a
/// participant's (1 to 32 bytes of `[a-z0-9_-]`, starting with a letter).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClientName(String);

impl ClientName {
    /// Checks `name` against the naming rule.
    pub fn new(name: impl Into<String>) -> Result<Self, String> {
        let name = name.into();
        ParticipantName::new(name.clone())
            .map_err(|e| format!("client name {name:?}: {}", e.why))?;
        Ok(ClientName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ClientName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        ClientName::new(s)
    }
}

impl std::str::FromStr for ClientName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ClientName::new(s)
    }
}

impl From<ClientName> for String {
    fn from(n: ClientName) -> String {
        n.0
    }
}

impl fmt::Display for ClientName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The log's key for `client`'s `request_id`: `<client>/<request_id>`.
/// A request id has no `/` (`api::check_id`), so keys of different clients
/// never meet: each client has its own namespace of request ids.
pub fn scope_request_id(client: &ClientName, request_id: &str) -> String {
    format!("{client}/{request_id}")
}

/// A scoped key's client and the client's own request id; `None` for a key
/// with no client (recorded before request ids were scoped).
pub fn split_request_id(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_name_is_one_subject_token() {
        assert!(ClientName::new(DEFAULT_CLIENT).is_ok());
        for bad in ["", "we b", "shop.>", "*", "Web", "1web", &"a".repeat(33)] {
            assert!(ClientName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_client_subject_names_its_client() {
        use crate::subjects::{client_of, client_tx, purchase};
        let web = ClientName::new("web").unwrap();
        assert_eq!(client_of(&purchase(&web)), Some(web.clone()));
        assert_eq!(client_of(&client_tx(&web)), Some(web));
        for bad in [
            "shop.tx",
            "shop.in_doubt.x.y",
            "shop.Web.purchase",
            "x.web.purchase",
            "shop..tx",
        ] {
            assert_eq!(client_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn scoped_request_ids_of_two_clients_never_meet() {
        let web = ClientName::new("web").unwrap();
        let app = ClientName::new("app").unwrap();
        let k = scope_request_id(&web, "order-1");
        assert_eq!(k, "web/order-1");
        assert_ne!(k, scope_request_id(&app, "order-1"));
        assert_eq!(split_request_id(&k), Some(("web", "order-1")));
        assert_eq!(split_request_id("legacy"), None);
    }
}
