//! Who may do what on the bus: one NKey user per role, its seed in a file
//! only its owner can read, and the nats-server `authorization` block that
//! gives each role exactly the subjects it needs.
//!
//! | role | publishes | subscribes (queue group) |
//! |---|---|---|
//! | coordinator | `twopc.*.prepare`, `twopc.*.decide`, `P.in_doubt` (status page), its KV bucket, creating the owners bucket | `shop.*.purchase`, `shop.*.transaction`, `shop.*.tx`, `shop.tx`, `shop.in_doubt`, `twopc.decision.*` (`twopc-coordinator`) |
//! | participant P | `twopc.decision.P`, `twopc.P.owner`, its own owner lease `$KV.twopc_owners.P` (and reading that bucket) | `twopc.P.prepare`, `twopc.P.decide`, `P.>` (`twopc-P`); `twopc.P.owner` |
//! | client C | `shop.C.>`, `order.stock` | — |
//! | admin | every participant's public subjects, `shop.tx`, `shop.in_doubt`, `$SRV.>`, reading the decision and owners buckets | — |
//!
//! Everyone also subscribes its own inbox `_INBOX_<name>.>` (and services
//! their `$SRV` discovery subjects); services answer requests through
//! `allow_responses` only; nobody else publishes `twopc.>`, and nobody
//! subscribes `twopc.>`, `_INBOX.>` or another's inbox. The JetStream API
//! is open to the coordinator for its own bucket, to each participant for
//! its own lease, and, read only, to admin.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use twopc_common::nats::{inbox_prefix, AuthArgs};
use twopc_schemas::client::{self, ClientName};
use twopc_schemas::{participant, subjects, ParticipantName};

/// The credentials folder inside a system's data folder.
pub const CREDS_DIR: &str = "creds";
/// The server config fragment with the users and their permissions, in the
/// credentials folder (a config elsewhere can `include` it).
pub const AUTH_CONF: &str = "auth.conf";
/// The cluster block's routes with their password, for a config of one's
/// own ([`Credentials::write_cluster_auth`]).
pub const CLUSTER_AUTH_CONF: &str = "cluster-auth.conf";
/// The routes' password file (cluster nodes authenticate each other).
const ROUTE_PASSWORD_FILE: &str = "route.password";
/// The route user's name.
pub const ROUTE_USER: &str = "route";
/// Largest message the server accepts (`max_payload`): the largest twopc
/// message (an in-doubt listing) with room to spare; the public requests'
/// own limit is 4 KiB.
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Participant(ParticipantName),
    /// A shop client: buys and reads its own purchases.
    Client(ClientName),
    /// Creates users and products, reads everything, never buys.
    Admin,
}

/// One role's permissions, as the server enforces them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to (besides replies, with `allow_responses`).
    pub publish: Vec<String>,
    /// Subjects it may subscribe to; `"subject queue"` allows only that
    /// queue group.
    pub subscribe: Vec<String>,
    /// May reply to requests it received (and only to those).
    pub allow_responses: bool,
}

impl Role {
    /// The identity's name: its seed file `<name>.nk`, its inbox
    /// `_INBOX_<name>` and its connections' name.
    pub fn name(&self) -> &str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Participant(p) => p.as_str(),
            Role::Client(c) => c.as_str(),
            Role::Admin => "admin",
        }
    }

    /// What the role may do: see the module's table. `participants` are
    /// those whose public subjects admin may use; `bucket` the decision
    /// log's KV bucket.
    pub fn permissions(&self, participants: &[ParticipantName], bucket: &str) -> Permissions {
        let inbox = format!("{}.>", inbox_prefix(self.name()));
        let discovery = |name: &str| {
            vec![
                "$SRV.*".to_owned(),
                format!("$SRV.*.{name}"),
                format!("$SRV.*.{name}.*"),
            ]
        };
        let stream = format!("KV_{bucket}");
        let owners = format!("KV_{}", subjects::OWNER_BUCKET);
        match self {
            Role::Coordinator => {
                let queue = subjects::queue_group("coordinator");
                let mut subscribe: Vec<String> = [
                    subjects::PURCHASES,
                    subjects::TRANSACTIONS,
                    subjects::CLIENT_TXS,
                    subjects::TX_STATUS,
                    subjects::IN_DOUBT,
                    subjects::DECISION_QUERIES,
                ]
                .iter()
                .map(|s| format!("{s} {queue}"))
                .collect();
                subscribe.extend(discovery("coordinator"));
                subscribe.push(inbox);
                let mut publish = vec!["twopc.*.prepare".to_owned(), "twopc.*.decide".to_owned()];
                // The status page asks each participant what it holds.
                publish.extend(participants.iter().map(subjects::participant_in_doubt));
                publish.extend([
                    "$JS.API.INFO".to_owned(),
                    format!("$JS.API.STREAM.*.{stream}"),
                    format!("$JS.API.STREAM.MSG.*.{stream}"),
                    format!("$JS.API.CONSUMER.*.{stream}"),
                    format!("$JS.API.CONSUMER.*.{stream}.>"),
                    format!("$JS.API.DIRECT.GET.{stream}"),
                    format!("$JS.API.DIRECT.GET.{stream}.>"),
                    format!("$JS.FC.{stream}.>"),
                    format!("$JS.ACK.{stream}.>"),
                    format!("$KV.{bucket}.>"),
                    // It makes the participants' owner bucket, and only that.
                    format!("$JS.API.STREAM.CREATE.{owners}"),
                    format!("$JS.API.STREAM.INFO.{owners}"),
                ]);
                Permissions {
                    publish,
                    subscribe,
                    allow_responses: true,
                }
            }
            Role::Participant(p) => {
                let queue = subjects::queue_group(p.as_str());
                let mut subscribe: Vec<String> =
                    [subjects::prepare(p), subjects::decide(p), format!("{p}.>")]
                        .iter()
                        .map(|s| format!("{s} {queue}"))
                        .collect();
                subscribe.extend(discovery(p.as_str()));
                // Instances of P ask each other who serves (no queue).
                subscribe.push(subjects::owner_ping(p));
                subscribe.push(inbox);
                Permissions {
                    publish: vec![
                        subjects::decision_query(p),
                        subjects::owner_ping(p),
                        // Its own owner lease: read the bucket, write its
                        // own key. Never create or change a stream.
                        "$JS.API.INFO".to_owned(),
                        format!("$JS.API.STREAM.INFO.{owners}"),
                        format!("$JS.API.STREAM.MSG.GET.{owners}"),
                        format!("$KV.{}.{p}", subjects::OWNER_BUCKET),
                    ],
                    subscribe,
                    allow_responses: true,
                }
            }
            Role::Client(c) => Permissions {
                publish: vec![format!("shop.{c}.>"), subjects::ORDER_STOCK.to_owned()],
                subscribe: vec![inbox],
                allow_responses: false,
            },
            Role::Admin => {
                let mut publish: Vec<String> =
                    participants.iter().map(|p| format!("{p}.>")).collect();
                publish.extend([
                    subjects::TX_STATUS.to_owned(),
                    subjects::IN_DOUBT.to_owned(),
                    "$SRV.>".to_owned(),
                    // Reading the decision log (the checker, `twopc
                    // chaos`): stream info, message gets and ordered
                    // consumers; never a write.
                    "$JS.API.INFO".to_owned(),
                    format!("$JS.API.STREAM.INFO.{stream}"),
                    format!("$JS.API.STREAM.MSG.GET.{stream}"),
                    format!("$JS.API.DIRECT.GET.{stream}"),
                    format!("$JS.API.DIRECT.GET.{stream}.>"),
                    format!("$JS.API.CONSUMER.CREATE.{stream}"),
                    format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
                    format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
                    format!("$JS.API.CONSUMER.INFO.{stream}.>"),
                    format!("$JS.FC.{stream}.>"),
                    // Who owns each participant name (`twopc owners`).
                    format!("$JS.API.STREAM.INFO.{owners}"),
                    format!("$JS.API.STREAM.MSG.GET.{owners}"),
                ]);
                Permissions {
                    publish,
                    subscribe: vec![inbox],
                    allow_responses: false,
                }
            }
        }
    }
}

/// The roles of a purchase system: the coordinator, the purchase's
/// participants and `more_participants`, admin and the shop clients
/// `clients`.
pub fn roles(clients: &[ClientName], more_participants: &[ParticipantName]) -> Vec<Role> {
    let mut roles = vec![Role::Coordinator];
    roles.extend(
        participant::PURCHASE_PARTICIPANTS
            .iter()
            .chain(more_participants)
            .cloned()
            .map(Role::Participant),
    );
    roles.push(Role::Admin);
    roles.extend(clients.iter().cloned().map(Role::Client));
    roles
}

/// The default shop client's name, [`client::DEFAULT_CLIENT`].
pub fn default_client() -> ClientName {
    ClientName::new(client::DEFAULT_CLIENT).expect("valid")
}

/// One NKey identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    /// Its public key (`U...`), which the server's config lists.
    pub public_key: String,
}

/// A system's credentials: the identities whose seeds are in `dir`, and the
/// routes' password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub dir: PathBuf,
    pub identities: Vec<Identity>,
    route_password: String,
}

impl Credentials {
    /// Loads the credentials in `dir`, first making any that is missing:
    /// a seed file `<name>.nk` per role (mode 0600, in a folder of mode
    /// 0700) and the routes' password. Existing seeds are kept, so a
    /// restart keeps every client's credentials valid. Also writes
    /// [`AUTH_CONF`] for the current roles.
    pub fn ensure(dir: &Path, roles: &[Role], bucket: &str) -> anyhow::Result<Credentials> {
        check_roles(roles)?;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let mut identities = vec![];
        for role in roles {
            let path = dir.join(format!("{}.nk", role.name()));
            let seed = if path.exists() {
                twopc_common::nats::read_seed(&path)?
            } else {
                let pair = nkeys::KeyPair::new_user();
                let seed = pair.seed().context("encoding a new NKey seed")?;
                write_private(
                    &path,
                    &format!(
                        "# NKey seed of twopc identity {:?}: keep it secret.\n{seed}\n",
                        role.name()
                    ),
                )?;
                seed
            };
            let pair = nkeys::KeyPair::from_seed(&seed)
                .with_context(|| format!("bad NKey seed in {}", path.display()))?;
            identities.push(Identity {
                role: role.clone(),
                public_key: pair.public_key(),
            });
        }
        let pw_path = dir.join(ROUTE_PASSWORD_FILE);
        let route_password = if pw_path.exists() {
            std::fs::read_to_string(&pw_path)?.trim().to_owned()
        } else {
            let pw = random_hex();
            write_private(&pw_path, &format!("{pw}\n"))?;
            pw
        };
        let creds = Credentials {
            dir: dir.to_owned(),
            identities,
            route_password,
        };
        write_private(&dir.join(AUTH_CONF), &creds.authorization(bucket))?;
        Ok(creds)
    }

    /// The seed file of identity `name`.
    pub fn seed_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.nk"))
    }

    /// How identity `name` connects: its seed file (its inbox prefix
    /// follows from the file's name).
    pub fn auth(&self, name: &str) -> AuthArgs {
        AuthArgs::nkey_file(self.seed_file(name))
    }

    /// The participants among the identities.
    fn participants(&self) -> Vec<ParticipantName> {
        self.identities
            .iter()
            .filter_map(|i| match &i.role {
                Role::Participant(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// The nats-server config text: `authorization` with every identity
    /// and its permissions, and `max_payload`.
    pub fn authorization(&self, bucket: &str) -> String {
        let participants = self.participants();
        let mut t = String::new();
        t.push_str("# Written by twopc: one NKey user per role (seeds in this folder).\n");
        let _ = writeln!(t, "max_payload: {MAX_PAYLOAD_BYTES}");
        t.push_str("authorization {\n  users = [\n");
        for i in &self.identities {
            let p = i.role.permissions(&participants, bucket);
            let _ = writeln!(t, "    # {}", i.role.name());
            let _ = writeln!(t, "    {{ nkey: {}, permissions: {{", quoted(&i.public_key));
            let _ = writeln!(t, "        publish: {{ allow: {} }}", list(&p.publish));
            if p.subscribe.is_empty() {
                let _ = writeln!(t, "        subscribe: {{ deny: [\">\"] }}");
            } else {
                let _ = writeln!(t, "        subscribe: {{ allow: {} }}", list(&p.subscribe));
            }
            if p.allow_responses {
                t.push_str("        allow_responses: true\n");
            }
            t.push_str("    } },\n");
        }
        t.push_str("  ]\n}\n");
        t
    }

    /// The cluster block's route authorization, and the URL form a route
    /// to `127.0.0.1:port` takes with it.
    pub fn route_authorization(&self) -> String {
        format!(
            "authorization {{ user: {}, password: {} }}",
            quoted(ROUTE_USER),
            quoted(&self.route_password)
        )
    }

    /// Writes [`CLUSTER_AUTH_CONF`]: the body of a `cluster { }` block's
    /// route authorization and its routes to `hosts` (`host:port`), each
    /// with the password (a config includes it inside its cluster block,
    /// as compose/nats/cluster.conf does).
    pub fn write_cluster_auth(&self, hosts: &[String]) -> anyhow::Result<PathBuf> {
        let routes: Vec<String> = hosts
            .iter()
            .map(|h| format!("nats-route://{ROUTE_USER}:{}@{h}", self.route_password))
            .collect();
        let text = format!(
            "# Written by twopc auth init: routes authenticate with the password.\n{}\nroutes: {}\n",
            self.route_authorization(),
            list(&routes)
        );
        let path = self.dir.join(CLUSTER_AUTH_CONF);
        write_private(&path, &text)?;
        Ok(path)
    }

    /// A route URL that authenticates.
    pub fn route_url(&self, port: u16) -> String {
        format!(
            "nats-route://{ROUTE_USER}:{}@127.0.0.1:{port}",
            self.route_password
        )
    }
}

/// Refuses duplicate identities and clients named like a role.
fn check_roles(roles: &[Role]) -> anyhow::Result<()> {
    let mut names: Vec<&str> = roles.iter().map(Role::name).collect();
    for r in roles {
        if let Role::Client(c) = r {
            let reserved = client::RESERVED.contains(&c.as_str())
                || participant::PURCHASE_PARTICIPANTS
                    .iter()
                    .any(|p| p == c.as_str());
            if reserved {
                bail!("a client may not be named {c:?}: the name of a role");
            }
        }
    }
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("two identities named {:?}", w[0]);
    }
    Ok(())
}

/// Writes `text` to a new or truncated file readable by its owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    // An existing file keeps its mode through open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// 24 random bytes (a CSPRNG seeded by the OS) as hex.
fn random_hex() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quoted(s)).collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Role> {
        roles(
            &[default_client(), ClientName::new("app").unwrap()],
            &[ParticipantName::new("ledger").unwrap()],
        )
    }

    fn perms(r: &Role) -> Permissions {
        r.permissions(
            &participant::PURCHASE_PARTICIPANTS,
            subjects::DECISION_BUCKET,
        )
    }

    #[test]
    fn only_the_coordinator_publishes_prepares_and_decisions() {
        for r in all() {
            let p = perms(&r);
            // A participant's own `twopc.<p>.owner` is its instances' talk,
            // not a protocol message.
            let own_ping = match &r {
                Role::Participant(n) => subjects::owner_ping(n),
                _ => String::new(),
            };
            let forges = p.publish.iter().any(|s| {
                s.starts_with("twopc.") && !s.starts_with("twopc.decision.") && *s != own_ping
            });
            assert_eq!(forges, r == Role::Coordinator, "{r:?}: {:?}", p.publish);
        }
    }

    #[test]
    fn each_identity_listens_only_below_its_own_inbox_and_never_to_everything() {
        for r in all() {
            let p = perms(&r);
            let own = format!("{}.>", inbox_prefix(r.name()));
            assert!(p.subscribe.contains(&own), "{r:?}");
            for s in &p.subscribe {
                let subject = s.split(' ').next().unwrap();
                assert!(
                    !matches!(subject, ">" | "_INBOX.>" | "twopc.>")
                        && !subject.starts_with("_INBOX")
                        || *s == own,
                    "{r:?} subscribes {s}"
                );
            }
        }
    }

    #[test]
    fn a_participant_sends_decision_queries_only_in_its_own_name() {
        for r in all() {
            if let Role::Participant(p) = &r {
                let publish = perms(&r).publish;
                let twopc: Vec<&String> =
                    publish.iter().filter(|s| s.starts_with("twopc.")).collect();
                assert_eq!(
                    twopc,
                    vec![&subjects::decision_query(p), &subjects::owner_ping(p)]
                );
                // It writes only its own owner lease, and makes no stream.
                let writes: Vec<&String> =
                    publish.iter().filter(|s| s.starts_with("$KV.")).collect();
                assert_eq!(writes, vec![&format!("$KV.{}.{p}", subjects::OWNER_BUCKET)]);
                assert!(
                    publish.iter().all(|s| !s.contains("STREAM.CREATE")
                        && !s.contains("STREAM.UPDATE")
                        && !s.contains("CONSUMER")),
                    "{publish:?}"
                );
                // and its protocol subjects only in its own queue group
                let queue = subjects::queue_group(p.as_str());
                for s in perms(&r)
                    .subscribe
                    .iter()
                    .filter(|s| s.starts_with("twopc.") && **s != subjects::owner_ping(p))
                {
                    assert!(s.ends_with(&format!(" {queue}")), "{s}");
                }
            }
        }
    }

    #[test]
    fn seeds_are_private_kept_across_starts_and_the_config_lists_every_identity() {
        let dir = std::env::temp_dir().join(format!("twopc-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Credentials::ensure(&dir, &all(), subjects::DECISION_BUCKET).unwrap();
        let again = Credentials::ensure(&dir, &all(), subjects::DECISION_BUCKET).unwrap();
        assert_eq!(first, again, "a second start made new keys");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for i in &first.identities {
            assert_eq!(mode(&first.seed_file(i.role.name())), 0o600, "{:?}", i.role);
        }
        let text = first.authorization(subjects::DECISION_BUCKET);
        assert!(text.contains(&format!("max_payload: {MAX_PAYLOAD_BYTES}")));
        for i in &first.identities {
            assert!(text.contains(&i.public_key), "{:?} missing", i.role);
        }
        for i in &first.identities {
            let seed = twopc_common::nats::read_seed(&first.seed_file(i.role.name())).unwrap();
            assert!(
                !text.contains(&seed),
                "{:?}'s seed is in the server's config",
                i.role
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_client_named_like_a_role_is_refused() {
        for name in ["admin", "coordinator", "wallet"] {
            let r = roles(&[ClientName::new(name).unwrap()], &[]);
            let dir = std::env::temp_dir().join("never-written");
            assert!(Credentials::ensure(&dir, &r, "b").is_err(), "{name}");
        }
    }
}
