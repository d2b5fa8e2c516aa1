//! One live owner per participant name.
//!
//! Two instances of the wallet that both served `twopc-wallet` would split
//! the money between two databases. So an instance serves nothing until it
//! owns its name, and stops writing as soon as it may not own it any more.
//!
//! **What owning is.** A lease ([`Lease`]) in the JetStream KV bucket
//! `twopc_owners` (made by the coordinator; see `coordinator::kv`), key =
//! the participant's name, holding:
//! * the **store**: the id of the data store that *is* this participant, a
//!   UUID its SQLite database got when it was made. An instance whose
//!   database is another store never serves under the name: it exits,
//!   naming the store's owner ([`Step::Refuse`]). Only `--replace-store`
//!   moves the name to a new store, and only once the old owner is gone;
//! * the **epoch**, raised by one at every takeover (compare-and-set on the
//!   revision the taker read): the owner's fencing token;
//! * the **owner**, renewed by compare-and-set every `lease_ms / 4`, or
//!   `None` after a clean shutdown.
//!
//! **Taking over.** An instance of the same store waits as a standby while
//! the owner lives — the shape of a rolling restart: start the new process
//! on the same folder, SIGTERM the old one, which drains and lets go, and
//! the standby takes over at once. It takes over from a silent owner when
//! the lease's revision has not moved for `lease_ms` by the standby's own
//! clock, or at once when the owner was on this host and folder and the
//! folder's lock file ([`LOCK_FILE`]) is free: the operating system frees
//! it when the process dies, and a paused process keeps it.
//!
//! **Fencing.** The owner counts its lease valid until the start of its
//! last successful renewal plus 9/10 of `lease_ms` on the monotonic clock.
//! The start is the send of the attempt that landed; when a renewal was
//! retried and the answer that would say which attempt landed was lost,
//! it is the send of the renewal's first attempt, the earliest that could
//! have ([`Renewal`]). A standby waits the full `lease_ms` from when *it*
//! saw the revision, which is after that start, so the two never overlap
//! while clocks run at rates within 10% of each other. And the database
//! itself keeps the epoch of the instance that took it last (table
//! `owner`): every write batch checks, with the write lock held, that the
//! epoch is still its own and that its lease has not lapsed
//! ([`Fence::check`], the writer's `db::Guard`), else the batch is rolled
//! back. A paused owner that wakes
//! up after a successor took over therefore writes nothing: its lapsed
//! lease stops it, and if it was paused between that check and its commit
//! the successor cannot have written its epoch before that commit (the
//! paused writer holds the lock), so the successor sees that batch. Its
//! next renewal then fails and it exits.
//!
//! **Without JetStream** (a server of one's own without it) there is no
//! lease to hold: the instance asks the others on `twopc.<name>.owner`
//! ([`crate::ownership::ping`]) and the database epoch still fences
//! instances on the same folder. That detects a second instance; it cannot
//! fence a paused owner on another folder. See ARCHITECTURE.md.
//!
//! **Both at once.** A server may gain or lose JetStream while instances
//! run, so an instance that asks and one that holds the lease may meet.
//! They see each other on the owner subject: whoever serves claims the name
//! there, a lease holder included, and no instance serves while another
//! claims it; an owner without a lease gives way to the lease holder of its
//! store, so the name moves under the lease once JetStream is back. The
//! rule and why it holds are in [`ping`]; [`hear`] and
//! [`ask_mode_owner_yields`] are its pure parts.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use rusqlite::{params, Connection};
use tracing::{error, info, warn};
use twopc_common::db::Guard;
use twopc_schemas::ownership::{Holder, Lease, OwnerPing};
use twopc_schemas::{subjects, ParticipantName};

/// The data folder's lock file, held (`flock`) by the owner for its life.
pub const LOCK_FILE: &str = "owner.lock";

/// The library's ownership table: one row, the store's id and the epoch
/// of the instance that took the database last.
pub(crate) const OWNER_SQL: &str = "
CREATE TABLE IF NOT EXISTS owner (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    store TEXT NOT NULL,
    epoch INTEGER NOT NULL CHECK (epoch >= 0)
);
";

/// The database's store id and epoch, making the store id when the
/// database is new.
pub fn store_of(conn: &Connection) -> rusqlite::Result<(String, u64)> {
    conn.execute(
        "INSERT OR IGNORE INTO owner (id, store, epoch) VALUES (1, ?1, 0)",
        [uuid::Uuid::now_v7().to_string()],
    )?;
    conn.query_row("SELECT store, epoch FROM owner WHERE id = 1", [], |r| {
        Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
    })
}

/// Writes `epoch` as the database's owner epoch if it is higher than the
/// one there; false if it is not (someone took the database with a newer
/// epoch).
pub fn take_epoch(conn: &Connection, epoch: u64) -> rusqlite::Result<bool> {
    let epoch =
        i64::try_from(epoch).map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
    let n = conn.execute(
        "UPDATE owner SET epoch = ?1 WHERE id = 1 AND epoch < ?1",
        params![epoch],
    )?;
    Ok(n == 1)
}

/// Settings of the lease.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// How long a lease lasts without renewal.
    pub lease_ms: u64,
    /// Take the name for this folder's store even though another store
    /// holds it (once that store's owner is gone).
    pub replace_store: bool,
}

/// This process, as a candidate owner.
#[derive(Debug, Clone)]
pub struct Me {
    pub instance: String,
    pub host: String,
    pub pid: u32,
    pub data_dir: String,
    pub store: String,
    /// The epoch in this folder's database.
    pub db_epoch: u64,
    pub settings: LeaseSettings,
}

impl Me {
    pub fn new(data_dir: &Path, store: String, db_epoch: u64, settings: LeaseSettings) -> Me {
        let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        Me {
            instance: uuid::Uuid::now_v7().to_string(),
            host: hostname(),
            pid: std::process::id(),
            data_dir: data_dir.display().to_string(),
            store,
            db_epoch,
            settings,
        }
    }

    fn holder(&self, locked: bool) -> Holder {
        Holder {
            instance: self.instance.clone(),
            host: self.host.clone(),
            pid: self.pid,
            data_dir: self.data_dir.clone(),
            locked,
            lease_ms: self.settings.lease_ms,
            since_ms: twopc_common::now_ms(),
            renewals: 0,
        }
    }

    /// The lease this process writes when it takes over from `seen`.
    fn taking(&self, seen: Option<&Lease>, locked: bool) -> Lease {
        Lease {
            store: self.store.clone(),
            epoch: seen.map_or(0, |l| l.epoch).max(self.db_epoch) + 1,
            owner: Some(self.holder(locked)),
        }
    }
}

/// The host's name, for the lease (and the same-host check).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// What a candidate does after reading the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// No lease yet: create it (put-if-absent).
    Create(Lease),
    /// Replace the lease read (compare-and-set on its revision).
    TakeOver(Lease),
    /// A live owner of this store: wait as a standby.
    Wait(Holder),
    /// The name belongs to another store: never serve; exit saying this.
    Refuse(String),
}

/// The one rule of taking a name, without I/O. `seen`: the lease read;
/// `silent`: how long its revision has not moved, by this process's clock,
/// since this process first read it; `lock_free`: this process holds the
/// data folder's lock file.
pub fn judge(me: &Me, seen: Option<&Lease>, silent: Duration, lock_free: bool) -> Step {
    let Some(lease) = seen else {
        return Step::Create(me.taking(None, lock_free));
    };
    let gone = match &lease.owner {
        None => true,
        Some(h) => {
            let dead_here = h.locked && lock_free && h.host == me.host && h.data_dir == me.data_dir;
            dead_here || silent >= Duration::from_millis(h.lease_ms)
        }
    };
    if lease.store != me.store {
        let whose = match &lease.owner {
            Some(h) if !gone => format!("its live owner is {h}"),
            Some(h) => format!("its last owner, {h}, is silent"),
            None => "its last owner stopped cleanly".into(),
        };
        if me.settings.replace_store && gone {
            return Step::TakeOver(me.taking(Some(lease), lock_free));
        }
        let how = if gone {
            "start this instance on the store's data folder, or if that store is lost for good, start it with --replace-store"
        } else {
            "scale a participant by partitioning it (see ARCHITECTURE.md), not by a second instance with its own data"
        };
        return Step::Refuse(format!(
            "not serving: the name belongs to store {} (epoch {}) and {whose}; this data folder {} holds store {}. Two stores under one name would split its data: {how}",
            lease.store, lease.epoch, me.data_dir, me.store
        ));
    }
    match &lease.owner {
        Some(h) if !gone => Step::Wait(h.clone()),
        _ => Step::TakeOver(me.taking(Some(lease), lock_free)),
    }
}

/// What an instance that claims the name heard when it asked on
/// `twopc.<name>.owner` who else claims it (see [`ping`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// Nobody else claims it.
    Clear,
    /// An instance of this store claims it: serve nothing while it does.
    Wait(OwnerPing),
    /// An instance of another store claims it: never serve under the name
    /// beside it (two stores would split the participant's data).
    OtherStore(OwnerPing),
}

/// The rule of the owner subject, without I/O: what the `answers` to one
/// ask mean to `me`, which claims the name itself (it answers "serving").
/// Only answers that claim the name (`serving`) count: an instance that
/// does not claim it yet asks again after raising its claim, and then
/// hears this one. `fenced` is the lease holder this instance took the
/// lease from, if any: the lease fences it (its next renewal fails, and its
/// lapsed lease stops its writes), so what it still says is not a claim.
/// Another store's claim comes first, since it means never serving; among
/// this store's, the earliest started is named.
pub fn hear(me: &Me, fenced: Option<&str>, answers: &[OwnerPing]) -> Heard {
    let mut claims: Vec<&OwnerPing> = answers
        .iter()
        .filter(|o| o.serving && o.instance != me.instance && Some(o.instance.as_str()) != fenced)
        .collect();
    claims.sort_by(|a, b| a.instance.cmp(&b.instance));
    if let Some(o) = claims.iter().find(|o| o.store != me.store) {
        return Heard::OtherStore((*o).clone());
    }
    match claims.first() {
        Some(o) => Heard::Wait((*o).clone()),
        None => Heard::Clear,
    }
}

/// Whether an owner that serves without a lease (asking) must stop on
/// hearing `other` claim the name too; `lease` is the name's lease as read
/// now, if there is one. It gives way to a holder of the lease for its own
/// store (that holder serves nothing while this one claims the name, so
/// without this rule the name would never move under the lease once
/// JetStream is back), and otherwise to an instance that started before it
/// (instance ids are UUIDv7): of two that meet, both compute the same
/// answer, so exactly one goes.
pub fn ask_mode_owner_yields(me: &Me, other: &OwnerPing, lease: Option<&Lease>) -> bool {
    if !other.serving || other.instance == me.instance {
        return false;
    }
    let holds_lease = lease
        .and_then(|l| l.owner.as_ref())
        .is_some_and(|h| h.instance == other.instance);
    (holds_lease && other.store == me.store) || other.instance < me.instance
}

/// Whether a lease holder may serve without asking, given how long after
/// sending a request to the owner subject that nobody listened on (the
/// server answered "no responders") its own claim was up there. An
/// instance without a lease that subscribes after that request asks a
/// first time, waits a whole [`ping::ASK_WINDOW`], and only then asks the
/// ask that would clear it: if the claim was up within half a window of the
/// request, that ask hears the claim (half a window is left for clocks
/// and scheduling).
pub fn claimed_in_time(since_probe: Duration) -> bool {
    since_probe <= ping::ASK_WINDOW / 2
}

/// Why an instance does not serve beside `o`, an instance of another store.
fn foreign_owner(me: &Me, o: &OwnerPing) -> String {
    format!(
        "not serving: {o} serves the name with store {}, without a lease (it asks on the owner subject, as on a server without JetStream); this data folder {} holds store {}. Two stores under one name would split its data: stop the other instance, or start this one on that store's data folder",
        o.store, me.data_dir, me.store
    )
}

/// How a lease holder asks who else claims its name.
#[derive(Clone)]
struct Asker {
    client: async_nats::Client,
    subject: String,
    me: Me,
    /// The holder the lease was taken from (see [`hear`]).
    predecessor: Option<String>,
}

impl Asker {
    async fn hear(&self) -> anyhow::Result<Heard> {
        let answers = ping::ask(&self.client, &self.subject, &ping::me_now(&self.me, true)).await?;
        Ok(hear(&self.me, self.predecessor.as_deref(), &answers))
    }
}

/// The lease's validity, shared by the renewal task and the database's
/// writer (through [`Fence::guard`]).
pub struct Fence {
    epoch: u64,
    base: Instant,
    /// Valid until this many ms after `base`.
    valid_until_ms: AtomicU64,
    margin_ms: u64,
    lease_ms: u64,
    lost: Mutex<Option<String>>,
    lost_tx: tokio::sync::watch::Sender<bool>,
}

impl Fence {
    /// A fence for `epoch`, valid for one lease from `since` (when the
    /// write that took the lease was sent).
    pub fn new(epoch: u64, lease_ms: u64, since: Instant) -> Arc<Fence> {
        let (lost_tx, _) = tokio::sync::watch::channel(false);
        let f = Fence {
            epoch,
            base: since,
            valid_until_ms: AtomicU64::new(0),
            margin_ms: lease_ms / 10,
            lease_ms,
            lost: Mutex::new(None),
            lost_tx,
        };
        f.renewed(since);
        Arc::new(f)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A renewal sent at `sent` succeeded.
    pub fn renewed(&self, sent: Instant) {
        let at = sent.saturating_duration_since(self.base).as_millis() as u64;
        self.valid_until_ms
            .fetch_max(at + self.lease_ms - self.margin_ms, Ordering::SeqCst);
    }

    /// Whether the lease counts as held at `now`.
    pub fn valid_at(&self, now: Instant) -> bool {
        (now.saturating_duration_since(self.base).as_millis() as u64)
            < self.valid_until_ms.load(Ordering::SeqCst)
    }

    /// The lease is gone for good; the service must stop.
    pub fn lose(&self, why: String) {
        if self.end(why.clone()) {
            error!(reason = %why, "FENCED: this instance no longer owns its participant name; it writes nothing more and exits");
        }
    }

    /// Nothing more may be written (the lease is lost, or being let go);
    /// true the first time.
    fn end(&self, why: String) -> bool {
        let mut lost = self.lost.lock().expect("fence lock");
        if lost.is_some() {
            return false;
        }
        *lost = Some(why);
        self.lost_tx.send_replace(true);
        true
    }

    /// Why the lease was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().expect("fence lock").clone()
    }

    /// Resolves once the lease is lost, with why.
    pub async fn lost_wait(&self) -> String {
        let mut rx = self.lost_tx.subscribe();
        let _ = rx.wait_for(|lost| *lost).await;
        self.lost().unwrap_or_default()
    }

    /// The check run before every write batch's commit (see the module).
    pub fn check(&self, conn: &Connection) -> Result<(), String> {
        if let Some(why) = self.lost() {
            return Err(format!("fenced: {why}"));
        }
        let epoch: i64 = conn
            .prepare_cached("SELECT epoch FROM owner WHERE id = 1")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(|e| format!("reading the owner epoch: {e}"))?;
        if epoch as u64 != self.epoch {
            let why = format!(
                "the database was taken by epoch {epoch}; this instance holds epoch {}",
                self.epoch
            );
            self.lose(why.clone());
            return Err(format!("fenced: {why}"));
        }
        if !self.valid_at(Instant::now()) {
            return Err("lease lapsed (not renewed in time); writing nothing until it is".into());
        }
        Ok(())
    }

    /// [`Fence::check`] as the database writer's guard.
    pub fn guard(self: &Arc<Self>) -> Guard {
        let fence = self.clone();
        Box::new(move |conn| fence.check(conn))
    }
}

/// The data folder's lock file, once held.
pub struct FolderLock {
    file: Option<std::fs::File>,
}

impl FolderLock {
    /// Tries to take `<data_dir>/owner.lock` without waiting.
    pub fn try_take(data_dir: &Path) -> FolderLock {
        let path = data_dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ok()
            .filter(|f| f.try_lock().is_ok());
        FolderLock { file }
    }

    pub fn held(&self) -> bool {
        self.file.is_some()
    }
}

/// The lease's key in the bucket.
struct LeaseKv {
    kv: kv::Store,
    key: String,
}

/// What a write of the lease came to.
enum Wrote {
    /// Written; the new revision.
    Yes(u64),
    /// Another writer was first (the revision moved, or the key exists).
    Lost,
}

impl LeaseKv {
    async fn read(&self) -> Result<Option<(Lease, u64)>, String> {
        // From the stream leader: a follower may not have applied the
        // latest renewal yet.
        match twopc_common::nats::kv_latest(&self.kv, &self.key).await {
            Ok(None) => Ok(None),
            Ok(Some((value, revision))) => Lease::parse(&value)
                .map(|l| Some((l, revision)))
                .map_err(|e| format!("the lease under {:?} is corrupt: {e}", self.key)),
            Err(e) => Err(format!("reading the lease: {e}")),
        }
    }

    async fn create(&self, lease: &Lease) -> Result<Wrote, String> {
        match self
            .kv
            .create(&self.key, Bytes::from(lease.to_json()))
            .await
        {
            Ok(rev) => Ok(Wrote::Yes(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Wrote::Lost),
            Err(e) => Err(format!("creating the lease: {e}")),
        }
    }

    async fn update(&self, lease: &Lease, revision: u64) -> Result<Wrote, String> {
        match self
            .kv
            .update(&self.key, Bytes::from(lease.to_json()), revision)
            .await
        {
            Ok(rev) => Ok(Wrote::Yes(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Wrote::Lost),
            Err(e) => Err(format!("writing the lease: {e}")),
        }
    }

    /// Deletes the lease if it is still at `revision`: the name is then
    /// as if never owned.
    async fn delete(&self, revision: u64) -> Result<(), String> {
        self.kv
            .delete_expect_revision(&self.key, Some(revision))
            .await
            .map_err(|e| format!("deleting the lease: {e}"))
    }

    /// After a write whose answer was lost or refused: whether the lease
    /// now is exactly `mine`, and at which revision.
    async fn is_mine(&self, mine: &Lease) -> Result<Option<u64>, String> {
        Ok(self
            .read()
            .await?
            .and_then(|(l, rev)| (&l == mine).then_some(rev)))
    }
}

/// The lease of participant `name` as it is now (read from the stream
/// leader), with its revision; `None` if the name was never owned. For
/// operators (`twopc owners`) and tests.
pub async fn read_lease(
    client: &async_nats::Client,
    name: &ParticipantName,
) -> anyhow::Result<Option<(Lease, u64)>> {
    let js = jetstream::new(client.clone());
    let kv = js.get_key_value(subjects::OWNER_BUCKET).await?;
    let key = name.as_str().to_owned();
    let lease = LeaseKv { kv, key };
    lease.read().await.map_err(anyhow::Error::msg)
}

/// What `$JS.API.INFO` said.
#[derive(Debug, PartialEq, Eq)]
enum JetStream {
    On,
    /// Definitely off: nobody answers the API, or the server says it is
    /// not enabled (for this account).
    Off,
    /// Not known now: a cluster without a meta leader (10008), a timeout, a
    /// lost connection.
    Unsure,
}

/// What a `$JS.API.INFO` reply says.
fn info_says(payload: &[u8]) -> JetStream {
    use async_nats::jetstream::ErrorCode;
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return JetStream::Unsure;
    };
    match v["error"]["err_code"].as_u64() {
        None if v["error"].is_null() => JetStream::On,
        Some(c)
            if c == ErrorCode::JETSTREAM_NOT_ENABLED.0
                || c == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT.0 =>
        {
            JetStream::Off
        }
        _ => JetStream::Unsure,
    }
}

async fn jetstream(client: &async_nats::Client) -> JetStream {
    let request = async_nats::Request::new()
        .payload(Bytes::new())
        .timeout(Some(Duration::from_secs(5)));
    match client.send_request("$JS.API.INFO", request).await {
        Ok(m) => info_says(&m.payload),
        Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => JetStream::Off,
        Err(_) => JetStream::Unsure,
    }
}

/// Whether the server has JetStream (for this account). Falling back to
/// asking is for servers without it, never for a JetStream that is down
/// for a moment (a cluster electing a leader): that must wait for the
/// lease. So "off" must be said twice in a row, and "not known" is asked
/// again for a while and then taken as "on" (the bucket wait follows).
async fn has_jetstream(client: &async_nats::Client, name: &ParticipantName) -> bool {
    let mut offs = 0;
    for _ in 0..20 {
        match jetstream(client).await {
            JetStream::On => return true,
            JetStream::Off => {
                offs += 1;
                if offs == 2 {
                    return false;
                }
            }
            JetStream::Unsure => offs = 0,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    warn!(participant = %name, "JetStream did not say whether it is on; waiting for the owners bucket");
    true
}

/// The lease this instance holds, and the task that renews it.
pub struct Ownership {
    pub fence: Arc<Fence>,
    /// Holds the data folder's lock file while this value lives.
    lock: FolderLock,
    /// Whether writes are fenced (all but `TWOPC_BREAK=no_owner`).
    fenced: bool,
    keeper: Option<Keeper>,
    /// Tasks that live as long as the ownership (the answerer on the
    /// owner subject; without JetStream also the checker).
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// What the answerer says: whether this instance claims the name.
    claim: Arc<AtomicBool>,
}

struct Keeper {
    kv: Arc<LeaseKv>,
    current: Arc<Mutex<(Lease, u64)>>,
    task: tokio::task::JoinHandle<()>,
}

/// How a participant instance comes to own its name.
pub struct Acquire<'a> {
    pub client: &'a async_nats::Client,
    pub name: &'a ParticipantName,
    pub data_dir: &'a Path,
    pub me: Me,
    /// The database, to write the epoch into once the lease is taken (in a
    /// mutex only so that the waiting future may move between threads).
    pub conn: &'a Mutex<Connection>,
}

impl Acquire<'_> {
    /// Waits until this instance owns its name (standby meanwhile), or
    /// fails when it must never serve under it.
    pub async fn run(self) -> anyhow::Result<Ownership> {
        if !has_jetstream(self.client, self.name).await {
            return ping::acquire(self).await;
        }
        let kv = Arc::new(self.bucket().await);
        let mut lock = FolderLock::try_take(self.data_dir);
        let poll = Duration::from_millis((self.me.settings.lease_ms / 10).clamp(20, 250));
        // The revision being watched, and since when (this clock).
        let mut watched: Option<(u64, Instant)> = None;
        let mut said_wait: Option<String> = None;
        loop {
            if !lock.held() {
                lock = FolderLock::try_take(self.data_dir);
            }
            let seen = match kv.read().await {
                Ok(seen) => seen,
                Err(e) => {
                    warn!(participant = %self.name, error = %e, "cannot read the owner lease; retrying");
                    tokio::time::sleep(poll * 4).await;
                    continue;
                }
            };
            let silent = match (&seen, watched) {
                (Some((_, rev)), Some((w, since))) if *rev == w => since.elapsed(),
                (Some((_, rev)), _) => {
                    watched = Some((*rev, Instant::now()));
                    Duration::ZERO
                }
                (None, _) => Duration::ZERO,
            };
            // The holder this instance would take the lease from: the
            // lease fences it (it can never renew again), so what it says
            // on the owner subject is not a claim to wait for.
            let predecessor = seen
                .as_ref()
                .and_then(|(l, _)| l.owner.as_ref())
                .map(|h| h.instance.clone());
            let step = judge(&self.me, seen.as_ref().map(|s| &s.0), silent, lock.held());
            // A write that binds the name to this store (the first lease,
            // or --replace-store) is not made while an instance of another
            // store serves it by asking: it would outlive this refusal.
            let binds = match &step {
                Step::Create(_) => true,
                Step::TakeOver(l) => seen.as_ref().is_some_and(|(s, _)| s.store != l.store),
                _ => false,
            };
            if binds {
                let asked = ping::ask(
                    self.client,
                    &subjects::owner_ping(self.name),
                    &ping::me_now(&self.me, false),
                )
                .await;
                match asked.map(|a| hear(&self.me, predecessor.as_deref(), &a)) {
                    Ok(Heard::OtherStore(o)) => {
                        anyhow::bail!("{}: {}", self.name, foreign_owner(&self.me, &o))
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(participant = %self.name, error = %e, "cannot ask who serves the name; retrying");
                        tokio::time::sleep(poll * 4).await;
                        continue;
                    }
                }
            }
            let sent = Instant::now();
            let (lease, wrote) = match step {
                Step::Refuse(why) => anyhow::bail!("{}: {why}", self.name),
                Step::Wait(holder) => {
                    let said = holder.instance.clone();
                    if said_wait.as_deref() != Some(&said) {
                        info!(participant = %self.name, owner = %holder, lease_ms = holder.lease_ms,
                            "STANDBY: {} is owned by {holder}; serving nothing until it stops or its lease lapses", self.name);
                        said_wait = Some(said);
                    }
                    tokio::time::sleep(poll).await;
                    continue;
                }
                Step::Create(lease) => {
                    let w = kv.create(&lease).await;
                    (lease, w)
                }
                Step::TakeOver(lease) => {
                    let rev = seen
                        .as_ref()
                        .map(|s| s.1)
                        .expect("a takeover has read a lease");
                    let w = kv.update(&lease, rev).await;
                    (lease, w)
                }
            };
            let created = seen.is_none();
            let revision = match wrote {
                Ok(Wrote::Yes(rev)) => rev,
                Ok(Wrote::Lost) => continue,
                Err(e) => match kv.is_mine(&lease).await {
                    Ok(Some(rev)) => rev,
                    _ => {
                        warn!(participant = %self.name, error = %e, "taking the lease did not answer; reading it again");
                        continue;
                    }
                },
            };
            // Renew from now on: writing the epoch may wait for a writer
            // that still holds the database (a paused one).
            let fence = Fence::new(lease.epoch, self.me.settings.lease_ms, sent);
            let epoch = lease.epoch;
            let store = lease.store.clone();
            let current = Arc::new(Mutex::new((lease, revision)));
            let asker = Asker {
                client: self.client.clone(),
                subject: subjects::owner_ping(self.name),
                me: self.me.clone(),
                predecessor,
            };
            let task = tokio::spawn(keep(
                kv.clone(),
                current.clone(),
                fence.clone(),
                self.me.settings.lease_ms,
                asker.clone(),
            ));
            // Claim the name on the owner subject, then look whether an
            // instance without a lease claims it too (see `ping`), unless
            // nobody listened there just before the claim went up.
            let probed = Instant::now();
            let nobody = ping::nobody_listens(self.client, self.name).await;
            let claim = Arc::new(AtomicBool::new(true));
            let mut owned = Ownership {
                fence: fence.clone(),
                lock,
                fenced: true,
                keeper: Some(Keeper { kv, current, task }),
                tasks: vec![],
                claim: claim.clone(),
            };
            owned
                .tasks
                .push(ping::answer(self.client, self.name, &self.me, claim).await?);
            let at_once = nobody && claimed_in_time(probed.elapsed());
            if at_once {
                info!(participant = %self.name, "nobody listened on the owner subject just before this instance claimed the name there: serving without asking");
            } else if let Err(o) = self.until_alone(&asker, &fence).await? {
                let why = foreign_owner(&self.me, &o);
                owned.withdraw(created).await;
                anyhow::bail!("{}: {why}", self.name);
            }
            self.write_epoch(epoch, &fence).await?;
            info!(participant = %self.name, epoch, %store,
                lease_ms = self.me.settings.lease_ms, folder_lock = owned.lock.held(),
                "OWNER: this instance owns {}", self.name);
            return Ok(owned);
        }
    }

    /// Holding the lease and claiming the name, waits until no instance
    /// without a lease claims it too ([`hear`]); `Err` with the claimant
    /// if it is of another store (this instance must then not serve).
    async fn until_alone(
        &self,
        asker: &Asker,
        fence: &Fence,
    ) -> anyhow::Result<Result<(), OwnerPing>> {
        let mut said: Option<String> = None;
        loop {
            if let Some(why) = fence.lost() {
                anyhow::bail!("{}: lost the lease before serving: {why}", self.name);
            }
            match asker.hear().await {
                Err(e) => {
                    warn!(participant = %self.name, error = %e, "cannot ask who serves the name; retrying");
                    tokio::time::sleep(ping::ASK_WINDOW).await;
                }
                Ok(Heard::Clear) => return Ok(Ok(())),
                Ok(Heard::OtherStore(o)) => return Ok(Err(o)),
                Ok(Heard::Wait(o)) => {
                    if said.as_deref() != Some(o.instance.as_str()) {
                        info!(participant = %self.name, owner = %o,
                            "STANDBY: {} is served by {o} without a lease (it asks on {}, as on a server without JetStream); this instance holds the lease and serves nothing until it stops", self.name, asker.subject);
                        said = Some(o.instance.clone());
                    }
                    tokio::time::sleep(ping::ASK_WINDOW).await;
                }
            }
        }
    }

    /// Writes `epoch` into the database, waiting while another process
    /// holds its write lock; fails if a newer epoch is there or the lease
    /// is lost meanwhile.
    async fn write_epoch(&self, epoch: u64, fence: &Fence) -> anyhow::Result<()> {
        let mut said = false;
        loop {
            if let Some(why) = fence.lost() {
                anyhow::bail!("{}: lost the lease before serving: {why}", self.name);
            }
            // Never wait on SQLite's lock here (this is the service's
            // runtime thread, which also renews the lease): ask once, and
            // sleep asynchronously when another process holds it.
            let taken = {
                let conn = self.conn.lock().expect("conn lock");
                conn.busy_timeout(Duration::ZERO)?;
                let taken = take_epoch(&conn, epoch);
                conn.busy_timeout(twopc_common::db::BUSY_TIMEOUT)?;
                taken
            };
            match taken {
                Ok(true) => return Ok(()),
                Ok(false) => anyhow::bail!(
                    "{}: the database holds an epoch newer than {epoch}: another instance took it; not serving",
                    self.name
                ),
                Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {
                    if !said {
                        warn!(participant = %self.name, "the database is locked by another process (a paused owner?); waiting to write the epoch");
                        said = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Acquire<'_> {
    /// The owners bucket, waiting for it to exist (the coordinator makes it).
    async fn bucket(&self) -> LeaseKv {
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(
                (self.me.settings.lease_ms / 4).clamp(500, 5_000),
            ))
            .build(self.client.clone());
        let mut said = false;
        loop {
            match js.get_key_value(subjects::OWNER_BUCKET).await {
                Ok(kv) => {
                    let key = self.name.as_str().to_owned();
                    return LeaseKv { kv, key };
                }
                Err(e) => {
                    if !said {
                        info!(participant = %self.name, bucket = subjects::OWNER_BUCKET, error = %e,
                            "waiting for the owners bucket (the coordinator makes it)");
                        said = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// The attempts of one renewal of the lease: each writes the next value
/// by compare-and-set on the revision the last renewal left, so at most one
/// of them ever lands. A retry follows an attempt whose answer was lost or
/// that was refused; the attempt may still have landed, or land later.
#[derive(Debug, Default)]
pub struct Renewal {
    /// Each attempt's value and when it was sent, oldest first.
    attempts: Vec<(Lease, Instant)>,
}

impl Renewal {
    /// An attempt writing `value` was sent at `at`.
    pub fn sent(&mut self, value: Lease, at: Instant) {
        self.attempts.push((value, at));
    }

    /// The latest attempt was acknowledged: when to count the lease from.
    pub fn acked(&self) -> Option<Instant> {
        self.attempts.last().map(|(_, at)| *at)
    }

    /// After an attempt that was refused or not answered, the lease read
    /// back is `seen`: when to count the lease from if an attempt of this
    /// renewal wrote it; `None` if none did (someone else wrote the lease).
    ///
    /// That is the send of the earliest attempt that wrote exactly `seen`.
    /// Retries write the same value, so the value cannot say which of them
    /// landed; and any of them may have (an earlier one whose answer was
    /// lost, or one that landed after its timeout). A standby counts its
    /// wait from when it saw the revision move, which is after the landed
    /// attempt was sent, so counting from the earliest possible send never
    /// lets the owner's lease outlast the standby's wait; counting from a
    /// later send could.
    pub fn landed(&self, seen: &Lease) -> Option<Instant> {
        self.attempts
            .iter()
            .find(|(value, _)| value == seen)
            .map(|(_, at)| *at)
    }
}

/// Renews the lease every quarter lease (sooner after a failure) until it
/// is lost. A renewal that lands after the lease lapsed is counted only
/// once `asker` heard nobody else claim the name: while this holder wrote
/// nothing and, paused, perhaps answered nothing either, an instance
/// without a lease may have begun to serve (see [`ping`]).
async fn keep(
    kv: Arc<LeaseKv>,
    current: Arc<Mutex<(Lease, u64)>>,
    fence: Arc<Fence>,
    lease_ms: u64,
    asker: Asker,
) {
    let every = Duration::from_millis(lease_ms / 4);
    let after_failure = Duration::from_millis((lease_ms / 20).clamp(20, 250));
    let mut wait = every;
    let mut renewal = Renewal::default();
    // The lease lapsed since the owner subject was last found clear.
    let mut lapsed = false;
    loop {
        tokio::time::sleep(wait).await;
        let (mut lease, revision) = current.lock().expect("lease lock").clone();
        if let Some(h) = lease.owner.as_mut() {
            h.renewals += 1;
        }
        renewal.sent(lease.clone(), Instant::now());
        let wrote = kv.update(&lease, revision).await;
        // The landed value's revision and when to count the lease from;
        // `None`: another writer's value is there.
        let outcome = match wrote {
            Ok(Wrote::Yes(rev)) => Ok(renewal.acked().map(|at| (rev, at))),
            // Refused: unless it is this renewal's value (an earlier
            // attempt's answer was lost), someone else wrote the lease.
            Ok(Wrote::Lost) => kv
                .read()
                .await
                .map(|seen| seen.and_then(|(l, rev)| renewal.landed(&l).map(|at| (rev, at)))),
            Err(e) => match kv.read().await {
                Ok(Some((l, rev))) => match renewal.landed(&l) {
                    Some(at) => Ok(Some((rev, at))),
                    None => Err(e),
                },
                _ => Err(e),
            },
        };
        match outcome {
            Ok(Some((rev, at))) => {
                *current.lock().expect("lease lock") = (lease, rev);
                renewal = Renewal::default();
                lapsed |= !fence.valid_at(Instant::now());
                if lapsed {
                    match asker.hear().await {
                        Ok(Heard::Clear) => lapsed = false,
                        Ok(Heard::OtherStore(o)) => {
                            fence.lose(format!("while its lease had lapsed, {o} began to serve the name with another store, without a lease"));
                            return;
                        }
                        // The lease stays lapsed (nothing written) while
                        // this store's other instance serves: it gives way
                        // to the lease holder ([`ask_mode_owner_yields`]).
                        Ok(Heard::Wait(o)) => {
                            warn!(owner = %o, "lease renewed, but {o} serves the name without a lease: writing nothing until it stops");
                            wait = ping::ASK_WINDOW;
                            continue;
                        }
                        Err(e) => {
                            warn!(error = %e, "lease renewed after it lapsed, but asking who else serves failed: writing nothing yet");
                            wait = after_failure;
                            continue;
                        }
                    }
                }
                fence.renewed(at);
                // Counted from an early attempt of a long-failing renewal,
                // the lease may have lapsed already: renew again at once
                // rather than write nothing for a quarter lease.
                wait = if fence.valid_at(Instant::now()) {
                    every
                } else {
                    after_failure
                };
            }
            Ok(None) => {
                let now = kv.read().await.ok().flatten();
                let who = match now
                    .as_ref()
                    .and_then(|(l, _)| l.owner.clone().map(|h| (h, l.epoch)))
                {
                    Some((h, epoch)) => format!("taken over by {h} at epoch {epoch}"),
                    None => "the lease changed under this instance".into(),
                };
                fence.lose(who);
                return;
            }
            Err(e) => {
                if !fence.valid_at(Instant::now()) {
                    warn!(error = %e, "lease renewal failing and the lease lapsed: writing nothing until it is renewed");
                } else {
                    warn!(error = %e, "lease renewal failed; retrying");
                }
                wait = after_failure;
            }
        }
    }
}

impl Ownership {
    /// The database writer's guard: [`Fence::check`], or nothing when
    /// unowned.
    pub fn guard(&self) -> Guard {
        if self.fenced {
            self.fence.guard()
        } else {
            Box::new(|_| Ok(()))
        }
    }

    /// No ownership at all (`TWOPC_BREAK=no_owner`): a fence that never
    /// lapses and a guard that checks nothing.
    pub fn unowned(db_epoch: u64) -> Ownership {
        Ownership {
            fence: Fence::new(db_epoch, u64::MAX / 4, Instant::now()),
            lock: FolderLock { file: None },
            fenced: false,
            keeper: None,
            tasks: vec![],
            claim: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Stops claiming the name on the owner subject: answers say "not
    /// serving" from now on, and the answerer is gone when this returns
    /// (its unsubscribe is queued on the connection before anything sent
    /// after, such as the release of the lease).
    async fn unclaim(&mut self) {
        self.claim.store(false, Ordering::SeqCst);
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }

    /// Withdraws a lease taken but never served under: deletes it if this
    /// instance `created` it (the name is then as if never owned; the lease
    /// would bind it to this store), else releases it.
    async fn withdraw(mut self, created: bool) {
        self.fence.end("withdrawn before serving".into());
        self.unclaim().await;
        let Some(k) = self.keeper.take() else { return };
        k.task.abort();
        let (lease, revision) = k.current.lock().expect("lease lock").clone();
        let done = if created {
            k.kv.delete(revision).await
        } else {
            k.kv.update(
                &Lease {
                    owner: None,
                    ..lease
                },
                revision,
            )
            .await
            .map(|_| ())
        };
        if let Err(e) = done {
            warn!(error = %e, "the lease taken was not withdrawn; it lapses");
        }
    }

    /// Lets go of the lease after a clean drain, so that a standby takes
    /// over at once. Nothing is written past this (the fence is lost).
    pub async fn release(mut self) {
        self.fence.end("released at shutdown".into());
        // Stop claiming the name on the owner subject first: a standby
        // that takes the released lease must not hear this instance.
        self.unclaim().await;
        let Some(k) = self.keeper.take() else { return };
        k.task.abort();
        let (lease, revision) = k.current.lock().expect("lease lock").clone();
        let released = Lease {
            owner: None,
            ..lease
        };
        match k.kv.update(&released, revision).await {
            Ok(Wrote::Yes(_)) => info!("lease released"),
            Ok(Wrote::Lost) => warn!("lease not released: it changed meanwhile"),
            Err(e) => warn!(error = %e, "lease not released; a standby takes over when it lapses"),
        }
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        if let Some(k) = &self.keeper {
            k.task.abort();
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Ownership on a server without JetStream: detection by asking; and how
/// lease holders and instances that ask see each other.
///
/// Every instance that claims the name, or is about to, subscribes
/// `twopc.<name>.owner` (not in a queue group) and answers every ask there
/// with what it is; `serving` in the answer is its claim. An ask collects
/// answers for [`ASK_WINDOW`](crate::ownership::ping::ASK_WINDOW). The
/// protocol assumes that an answer arrives within that window; it cannot
/// fence a paused process.
///
/// **Without JetStream.** An instance subscribes, then asks without
/// claiming. If an instance claims the name, it waits as a standby (same
/// store) or exits (another store); if only candidates answer, it backs
/// off a random while and asks again. If nobody answers, it raises its
/// claim and asks again: it serves only if that second ask hears no other
/// claim, else it lowers its claim, backs off and starts over. So every
/// instance raises its claim (answers "serving") *before* the ask that
/// clears it to serve, and serves only if that ask heard no claim. Of two
/// such instances, the one whose clearing ask comes second reaches the
/// other after the other raised its claim, so both cannot be cleared: at
/// most one serves. The owner asks again every few seconds
/// ([`ask_mode_owner_yields`] says when it stops).
///
/// **With a lease** the same rule holds for the lease holder, and that is
/// what makes the two kinds of owner see each other (a server may lose or
/// gain JetStream while instances run, and one that found it off asks
/// while a later one finds no lease). A lease holder raises its claim as
/// soon as its write of the lease has landed and keeps it up until it
/// exits or releases the lease; then it asks ([`hear`]), and serves only
/// once no other instance claims the name, ignoring the holder it took the
/// lease from (the lease fences that one). Another store's claim makes it
/// withdraw the lease and exit; this store's makes it wait, holding the
/// lease, until that instance stops, which it does once it hears that the
/// holder of the lease for its store claims the name. Lease standbys
/// neither claim nor answer: the lease holder claims for the lease.
///
/// The holder need not ask when the server answered "no responders" to a
/// request it sent on the subject just before its claim went up, and the
/// claim was up within half a window of that request ([`claimed_in_time`]):
/// nobody was there then, and an instance that comes later asks a first
/// time and waits a whole window before the ask that would clear it, which
/// then hears this claim. That is the usual case (a first start; a dead
/// owner; a rolling restart, where the old owner lowers its claim and
/// unsubscribes before it releases the lease), and it costs a round trip
/// instead of a window.
///
/// A holder whose lease lapsed (paused, or JetStream gone for a while) may
/// have missed an ask meanwhile, so it asks again before it writes under a
/// renewed lease. And before a write that binds the name to its store (the
/// first lease, or `--replace-store`), a candidate asks without claiming,
/// and exits without writing if another store serves the name: a lease
/// bound to the wrong store would outlive the refusal.
pub mod ping {
    use super::*;
    use futures::StreamExt;
    use rand::Rng;
    use twopc_schemas::ownership::OwnerPing;

    /// How long an ask collects answers.
    pub const ASK_WINDOW: Duration = Duration::from_millis(500);
    /// How often the owner asks again.
    const CHECK_EVERY: Duration = Duration::from_secs(3);

    pub(super) fn me_now(me: &Me, serving: bool) -> OwnerPing {
        OwnerPing {
            instance: me.instance.clone(),
            store: me.store.clone(),
            serving,
            host: me.host.clone(),
            pid: me.pid,
            data_dir: me.data_dir.clone(),
        }
    }

    /// Answers every ask on `twopc.<name>.owner` with what this instance
    /// is (`serving`: whether it claims the name now). Subscribed when this
    /// returns.
    pub async fn answer(
        client: &async_nats::Client,
        name: &ParticipantName,
        me: &Me,
        serving: Arc<AtomicBool>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let mut pings = client.subscribe(subjects::owner_ping(name)).await?;
        client.flush().await?;
        let (client, me) = (client.clone(), me.clone());
        Ok(tokio::spawn(async move {
            while let Some(m) = pings.next().await {
                if let Some(reply) = m.reply {
                    let now = me_now(&me, serving.load(Ordering::SeqCst));
                    let _ = client.publish(reply, now.to_json().into()).await;
                }
            }
        }))
    }

    /// The other instances' answers to one ask.
    pub(super) async fn ask(
        client: &async_nats::Client,
        subject: &str,
        me: &OwnerPing,
    ) -> anyhow::Result<Vec<OwnerPing>> {
        let inbox = client.new_inbox();
        let mut answers = client.subscribe(inbox.clone()).await?;
        client
            .publish_with_reply(subject.to_owned(), inbox, me.to_json().into())
            .await?;
        client.flush().await?;
        let mut seen = vec![];
        let deadline = tokio::time::Instant::now() + ASK_WINDOW;
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, answers.next()).await {
            // The server says nobody subscribes the subject (only when the
            // asker does not either): nobody can answer.
            if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                break;
            }
            match OwnerPing::parse(&m.payload) {
                Ok(a) if a.instance != me.instance => seen.push(a),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "ignoring an owner answer that does not parse"),
            }
        }
        Ok(seen)
    }

    /// Whether nobody subscribes the owner subject of `name` now: the
    /// server answers a request there with "no responders". Any answer, or
    /// none within half a window, means somebody might.
    pub(super) async fn nobody_listens(
        client: &async_nats::Client,
        name: &ParticipantName,
    ) -> bool {
        let request = async_nats::Request::new()
            .payload(Bytes::new())
            .timeout(Some(ASK_WINDOW / 2));
        matches!(
            client.send_request(subjects::owner_ping(name), request).await,
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders
        )
    }

    /// Aborts a task when dropped: the answerer of an instance that gives
    /// up before it owns the name.
    struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            if let Some(t) = self.0.take() {
                t.abort();
            }
        }
    }

    fn back_off() -> Duration {
        Duration::from_millis(rand::rng().random_range(100..600))
    }

    /// Among candidates that all hear each other, whether `me` goes ahead
    /// to claim: the one with the smallest instance id (a UUIDv7: the one
    /// started first). Safety does not rest on it — a claimant serves only
    /// if an ask made after its claim hears no other claim — only progress.
    pub(super) fn goes_ahead(me: &str, others: &[OwnerPing]) -> bool {
        others.iter().all(|o| me < o.instance.as_str())
    }

    pub(super) async fn acquire(a: Acquire<'_>) -> anyhow::Result<Ownership> {
        warn!(participant = %a.name, "the NATS server has no JetStream: no owner lease; detecting other instances by asking on {} (a paused owner elsewhere is not fenced; see ARCHITECTURE.md)", subjects::owner_ping(a.name));
        let subject = subjects::owner_ping(a.name);
        let claim = Arc::new(AtomicBool::new(false));
        let mut answerer = AbortOnDrop(Some(answer(a.client, a.name, &a.me, claim.clone()).await?));
        let lock = FolderLock::try_take(a.data_dir);
        let mut said_wait = None;
        loop {
            let others = ask(a.client, &subject, &me_now(&a.me, false)).await?;
            match hear(&a.me, None, &others) {
                Heard::OtherStore(owner) => anyhow::bail!(
                    "{}: not serving: {owner} serves it with store {}; this data folder {} holds store {}. Two stores under one name would split its data",
                    a.name, owner.store, a.me.data_dir, a.me.store
                ),
                Heard::Wait(owner) => {
                    if said_wait.as_ref() != Some(&owner.instance) {
                        info!(participant = %a.name, owner = %owner, "STANDBY: {} is served by {owner}; serving nothing until it stops", a.name);
                        said_wait = Some(owner.instance.clone());
                    }
                    tokio::time::sleep(ASK_WINDOW).await;
                    continue;
                }
                // Only candidates answered: the first of them goes ahead
                // and the others wait (all back off alike would hear each
                // other for ever: two standbys of an owner that stopped).
                Heard::Clear if !goes_ahead(&a.me.instance, &others) => {
                    tokio::time::sleep(back_off()).await;
                    continue;
                }
                Heard::Clear => {}
            }
            // Nobody claims the name: claim it, and serve only if an ask
            // made after the claim hears no other claim (see above).
            claim.store(true, Ordering::SeqCst);
            let again = ask(a.client, &subject, &me_now(&a.me, true)).await;
            match again.map(|o| hear(&a.me, None, &o)) {
                Ok(Heard::Clear) => {}
                Ok(_) => {
                    claim.store(false, Ordering::SeqCst);
                    tokio::time::sleep(back_off()).await;
                    continue;
                }
                Err(e) => {
                    claim.store(false, Ordering::SeqCst);
                    return Err(e);
                }
            }
            let epoch = a.me.db_epoch + 1;
            match take_epoch(&a.conn.lock().expect("conn lock"), epoch) {
                Ok(true) => {}
                // Someone on this folder took it meanwhile: ask again.
                Ok(false) => {
                    claim.store(false, Ordering::SeqCst);
                    continue;
                }
                Err(e) => {
                    claim.store(false, Ordering::SeqCst);
                    return Err(e.into());
                }
            }
            let fence = Fence::new(epoch, u64::MAX / 4, Instant::now());
            info!(participant = %a.name, epoch, "OWNER (no JetStream: by asking): this instance serves {}", a.name);
            let checker = {
                let (client, me, fence) = (a.client.clone(), a.me.clone(), fence.clone());
                let name = a.name.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(CHECK_EVERY).await;
                        let Ok(others) = ask(&client, &subject, &me_now(&me, true)).await else {
                            continue;
                        };
                        if !others.iter().any(|o| o.serving) {
                            continue;
                        }
                        // A claimant may hold the lease (JetStream is back).
                        let lease = read_lease(&client, &name)
                            .await
                            .ok()
                            .flatten()
                            .map(|(l, _)| l);
                        if let Some(o) = others
                            .iter()
                            .find(|o| ask_mode_owner_yields(&me, o, lease.as_ref()))
                        {
                            let holds = lease
                                .as_ref()
                                .and_then(|l| l.owner.as_ref())
                                .is_some_and(|h| h.instance == o.instance);
                            fence.lose(if holds {
                                format!("{o} holds the lease for this store (the server has JetStream again) and claims the name: it serves once this instance is gone")
                            } else {
                                format!("{o} serves this name too and started first")
                            });
                            return;
                        }
                    }
                })
            };
            return Ok(Ownership {
                fence,
                lock,
                fenced: true,
                keeper: None,
                tasks: answerer.0.take().into_iter().chain([checker]).collect(),
                claim,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me(store: &str, dir: &str) -> Me {
        Me {
            instance: "me".into(),
            host: "h1".into(),
            pid: 10,
            data_dir: dir.into(),
            store: store.into(),
            db_epoch: 0,
            settings: LeaseSettings {
                lease_ms: 1_000,
                replace_store: false,
            },
        }
    }

    fn held(store: &str, epoch: u64, host: &str, dir: &str, locked: bool) -> Lease {
        Lease {
            store: store.into(),
            epoch,
            owner: Some(Holder {
                instance: "other".into(),
                host: host.into(),
                pid: 20,
                data_dir: dir.into(),
                locked,
                lease_ms: 1_000,
                since_ms: 0,
                renewals: 3,
            }),
        }
    }

    const LIVE: Duration = Duration::from_millis(999);
    const SILENT: Duration = Duration::from_millis(1_000);

    #[test]
    fn the_first_instance_creates_the_lease_at_epoch_one() {
        let Step::Create(l) = judge(&me("s", "/d"), None, Duration::ZERO, true) else {
            panic!()
        };
        assert_eq!((l.store.as_str(), l.epoch), ("s", 1));
        assert_eq!(l.owner.unwrap().instance, "me");
    }

    #[test]
    fn a_live_owner_of_this_store_makes_a_standby() {
        let lease = held("s", 4, "h2", "/d", true);
        assert!(
            matches!(judge(&me("s", "/d"), Some(&lease), LIVE, true), Step::Wait(h) if h.instance == "other")
        );
    }

    #[test]
    fn a_silent_owner_is_taken_over_after_a_full_lease_with_the_next_epoch() {
        let lease = held("s", 4, "h2", "/d", true);
        let Step::TakeOver(l) = judge(&me("s", "/d"), Some(&lease), SILENT, false) else {
            panic!()
        };
        assert_eq!(l.epoch, 5);
        let mut newer_db = me("s", "/d");
        newer_db.db_epoch = 9;
        let Step::TakeOver(l) = judge(&newer_db, Some(&lease), SILENT, false) else {
            panic!()
        };
        assert_eq!(l.epoch, 10, "never below the database's own epoch");
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let lease = Lease {
            owner: None,
            ..held("s", 4, "h1", "/d", true)
        };
        assert!(
            matches!(judge(&me("s", "/e"), Some(&lease), Duration::ZERO, false), Step::TakeOver(l) if l.epoch == 5)
        );
    }

    #[test]
    fn a_dead_owner_on_this_host_and_folder_is_known_by_its_free_lock() {
        let lease = held("s", 4, "h1", "/d", true);
        assert!(matches!(
            judge(&me("s", "/d"), Some(&lease), Duration::ZERO, true),
            Step::TakeOver(_)
        ));
        // The lock is held: alive, perhaps paused.
        assert!(matches!(
            judge(&me("s", "/d"), Some(&lease), LIVE, false),
            Step::Wait(_)
        ));
        // Another folder or host, or an owner that never held the lock:
        // the free lock here says nothing about it.
        for other in [
            held("s", 4, "h1", "/other", true),
            held("s", 4, "h2", "/d", true),
            held("s", 4, "h1", "/d", false),
        ] {
            assert!(matches!(
                judge(&me("s", "/d"), Some(&other), LIVE, true),
                Step::Wait(_)
            ));
        }
    }

    #[test]
    fn another_store_is_refused_live_or_not() {
        for (silent, lease) in [
            (LIVE, held("s", 4, "h1", "/d", true)),
            (SILENT, held("s", 4, "h1", "/d", true)),
            (
                Duration::ZERO,
                Lease {
                    owner: None,
                    ..held("s", 4, "h1", "/d", true)
                },
            ),
        ] {
            let Step::Refuse(why) = judge(&me("t", "/e"), Some(&lease), silent, true) else {
                panic!()
            };
            assert!(
                why.contains("store s") && why.contains("holds store t"),
                "{why}"
            );
        }
    }

    #[test]
    fn replace_store_takes_a_gone_owners_name_but_never_a_live_one() {
        let mut m = me("t", "/e");
        m.settings.replace_store = true;
        let lease = held("s", 4, "h2", "/d", true);
        assert!(matches!(
            judge(&m, Some(&lease), LIVE, true),
            Step::Refuse(_)
        ));
        let Step::TakeOver(l) = judge(&m, Some(&lease), SILENT, true) else {
            panic!()
        };
        assert_eq!((l.store.as_str(), l.epoch), ("t", 5));
    }

    /// Only a server that says JetStream is off is taken as without it; a
    /// cluster without a meta leader for a moment is not.
    #[test]
    fn only_a_definite_answer_means_no_jetstream() {
        assert_eq!(
            info_says(br#"{"type":"io.nats.jetstream.api.v1.account_info_response","memory":0}"#),
            JetStream::On
        );
        assert_eq!(
            info_says(br#"{"error":{"code":503,"err_code":10039,"description":"jetstream not enabled for account"}}"#),
            JetStream::Off
        );
        assert_eq!(
            info_says(
                br#"{"error":{"code":503,"err_code":10076,"description":"jetstream not enabled"}}"#
            ),
            JetStream::Off
        );
        assert_eq!(
            info_says(br#"{"error":{"code":503,"err_code":10008,"description":"JetStream system temporarily unavailable"}}"#),
            JetStream::Unsure
        );
        assert_eq!(info_says(b"junk"), JetStream::Unsure);
    }

    /// Found by the Go participant's author (its test of two standbys):
    /// candidates that all back off alike hear each other for ever. The
    /// first of them goes ahead, exactly one, whatever order they ask in.
    #[test]
    fn among_candidates_exactly_the_first_goes_ahead() {
        let ids = [
            uuid::Uuid::now_v7().to_string(),
            uuid::Uuid::now_v7().to_string(),
            uuid::Uuid::now_v7().to_string(),
        ];
        let ahead: Vec<&String> = ids
            .iter()
            .filter(|me| {
                let others: Vec<OwnerPing> = ids
                    .iter()
                    .filter(|o| o != me)
                    .map(|o| ping(o, "s", false))
                    .collect();
                ping::goes_ahead(me, &others)
            })
            .collect();
        let first = ids.iter().min().unwrap();
        assert_eq!(ahead, vec![first], "the one started first");
        assert!(ping::goes_ahead(&ids[2], &[]), "alone, it goes ahead");
    }

    fn ping(instance: &str, store: &str, serving: bool) -> OwnerPing {
        OwnerPing {
            instance: instance.into(),
            store: store.into(),
            serving,
            host: "h2".into(),
            pid: 30,
            data_dir: "/x".into(),
        }
    }

    /// Finding 4 of issue 18: a lease holder serves nothing while an
    /// instance without a lease (which found JetStream off) claims the
    /// name: it waits if that instance is of its store, and never serves
    /// beside another store.
    #[test]
    fn a_lease_holder_does_not_serve_while_an_ask_mode_owner_claims_the_name() {
        let m = me("s", "/d");
        assert_eq!(
            hear(&m, None, &[ping("p", "s", true)]),
            Heard::Wait(ping("p", "s", true))
        );
        assert_eq!(
            hear(&m, None, &[ping("p", "t", true)]),
            Heard::OtherStore(ping("p", "t", true))
        );
        assert_eq!(hear(&m, None, &[]), Heard::Clear);
    }

    /// Candidates (not claiming yet) ask again after raising their claim
    /// and then hear this instance, so they are not waited for; nor is
    /// this instance's own answer, nor the holder the lease was taken from.
    #[test]
    fn only_other_claims_count_and_never_the_fenced_predecessor() {
        let m = me("s", "/d");
        let candidates = [ping("p", "s", false), ping("q", "t", false)];
        assert_eq!(hear(&m, None, &candidates), Heard::Clear);
        assert_eq!(hear(&m, None, &[ping("me", "s", true)]), Heard::Clear);
        assert_eq!(
            hear(&m, Some("old"), &[ping("old", "s", true)]),
            Heard::Clear
        );
        assert_eq!(
            hear(
                &m,
                Some("old"),
                &[ping("old", "s", true), ping("p", "s", true)]
            ),
            Heard::Wait(ping("p", "s", true))
        );
    }

    /// Another store's claim means never serving, so it is what is heard
    /// whatever else claims; among this store's, the earliest started.
    #[test]
    fn another_stores_claim_comes_first_then_the_earliest() {
        let m = me("s", "/d");
        let answers = [
            ping("b", "s", true),
            ping("c", "t", true),
            ping("a", "s", true),
        ];
        assert_eq!(
            hear(&m, None, &answers),
            Heard::OtherStore(ping("c", "t", true))
        );
        assert_eq!(
            hear(
                &m,
                None,
                &answers[..1]
                    .iter()
                    .chain(&answers[2..])
                    .cloned()
                    .collect::<Vec<_>>()
            ),
            Heard::Wait(ping("a", "s", true))
        );
    }

    /// An owner without a lease gives way to a holder of the lease for its
    /// store, which waits for it (else the name would never move under the
    /// lease), whoever started first; otherwise the later started goes.
    #[test]
    fn an_ask_mode_owner_gives_way_to_its_stores_lease_holder_and_to_an_earlier_instance() {
        let m = me("s", "/d");
        let by = |instance: &str, store: &str| Lease {
            store: store.into(),
            epoch: 1,
            owner: Some(Holder {
                instance: instance.into(),
                ..held(store, 1, "h2", "/x", false).owner.unwrap()
            }),
        };
        // "z" started after "me"; "a" before.
        assert!(ask_mode_owner_yields(
            &m,
            &ping("z", "s", true),
            Some(&by("z", "s"))
        ));
        assert!(!ask_mode_owner_yields(&m, &ping("z", "s", true), None));
        assert!(!ask_mode_owner_yields(
            &m,
            &ping("z", "s", true),
            Some(&by("y", "s"))
        ));
        assert!(
            !ask_mode_owner_yields(&m, &ping("z", "t", true), Some(&by("z", "t"))),
            "never to another store's later instance"
        );
        assert!(ask_mode_owner_yields(&m, &ping("a", "s", true), None));
        assert!(!ask_mode_owner_yields(&m, &ping("a", "s", false), None));
        assert!(!ask_mode_owner_yields(&m, &ping("me", "s", true), None));
    }

    /// A lease holder skips the ask only when its claim went up well within
    /// the window that a later instance waits before its clearing ask.
    #[test]
    fn a_claim_counts_as_in_time_only_within_half_an_ask_window() {
        assert!(claimed_in_time(Duration::from_millis(3)));
        assert!(claimed_in_time(ping::ASK_WINDOW / 2));
        assert!(!claimed_in_time(
            ping::ASK_WINDOW / 2 + Duration::from_millis(1)
        ));
        assert!(!claimed_in_time(ping::ASK_WINDOW));
    }

    /// Finding 5 of issue 18. A renewal whose first attempt's answer is
    /// lost is retried with the same value; the first attempt landed (just
    /// after it was sent) and the retry is refused. A standby saw the
    /// revision move when the first attempt landed and takes over a full
    /// lease after that; the owner must count its lease from the first
    /// attempt's send, so that it stops writing before the standby starts.
    #[test]
    fn a_retried_renewal_counts_from_the_earliest_send_that_could_have_landed() {
        let lease_ms = 1_000;
        let t0 = Instant::now();
        let fence = Fence::new(1, lease_ms, t0);
        let value = held("s", 1, "h1", "/d", true);
        let first = t0 + Duration::from_millis(250);
        let retry = first + Duration::from_millis(300);
        let mut renewal = Renewal::default();
        renewal.sent(value.clone(), first);
        renewal.sent(value.clone(), retry);
        let from = renewal.landed(&value).expect("this renewal's value");
        assert_eq!(from, first, "counted from the first attempt's send");
        fence.renewed(from);
        let landed = first + Duration::from_millis(5);
        let standby_takes_over = landed + Duration::from_millis(lease_ms);
        assert!(
            !fence.valid_at(standby_takes_over),
            "the owner still counts its lease valid when the standby takes over"
        );
        assert!(fence.valid_at(first + Duration::from_millis(899)));
    }

    /// An acknowledged attempt is the one that landed: no other attempt of
    /// the renewal can have (they all compare-and-set one revision).
    #[test]
    fn an_acknowledged_attempt_counts_from_its_own_send() {
        let t0 = Instant::now();
        let value = held("s", 1, "h1", "/d", true);
        let mut renewal = Renewal::default();
        assert_eq!(renewal.acked(), None);
        renewal.sent(value.clone(), t0);
        renewal.sent(value, t0 + Duration::from_millis(300));
        assert_eq!(renewal.acked(), Some(t0 + Duration::from_millis(300)));
    }

    /// A value that no attempt wrote is someone else's: nothing is credited.
    /// Attempts with different values are told apart exactly.
    #[test]
    fn only_a_value_this_renewal_wrote_is_credited() {
        let t0 = Instant::now();
        let (a, b) = (
            held("s", 1, "h1", "/d", true),
            held("s", 2, "h1", "/d", true),
        );
        let mut renewal = Renewal::default();
        renewal.sent(a.clone(), t0);
        assert_eq!(renewal.landed(&b), None);
        renewal.sent(b.clone(), t0 + Duration::from_millis(10));
        renewal.sent(a.clone(), t0 + Duration::from_millis(20));
        assert_eq!(renewal.landed(&b), Some(t0 + Duration::from_millis(10)));
        assert_eq!(renewal.landed(&a), Some(t0));
        assert_eq!(Renewal::default().landed(&a), None);
    }

    #[test]
    fn the_fence_refuses_a_lapsed_lease_and_a_newer_epoch() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(OWNER_SQL).unwrap();
        let (store, epoch) = store_of(&conn).unwrap();
        assert_eq!(epoch, 0);
        assert_eq!(store_of(&conn).unwrap().0, store, "made once");
        assert!(take_epoch(&conn, 3).unwrap());
        assert!(!take_epoch(&conn, 3).unwrap(), "not twice");
        let start = Instant::now();
        let fence = Fence::new(3, 1_000, start);
        assert!(fence.check(&conn).is_ok());
        assert!(fence.valid_at(start + Duration::from_millis(899)));
        assert!(!fence.valid_at(start + Duration::from_millis(900)));
        fence.renewed(start + Duration::from_millis(500));
        assert!(fence.valid_at(start + Duration::from_millis(1_399)));
        assert!(!fence.valid_at(start + Duration::from_millis(1_400)));
        // A successor took the database.
        assert!(take_epoch(&conn, 4).unwrap());
        let why = fence.check(&conn).unwrap_err();
        assert!(why.contains("epoch 4"), "{why}");
        assert!(fence.lost().is_some(), "lost for good");
    }
}
