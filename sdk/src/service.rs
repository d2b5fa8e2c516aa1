//! The running participant: its database, its subscriptions and the
//! service lifecycle ([`run_service`]: ownership, serve, drain).

use std::sync::Arc;

use bytes::Bytes;
use rusqlite::Connection;
use tracing::{info, warn};
use twopc_common::db::{self, Db, DbError, ReadDb};
use twopc_common::micro::Registry;
use twopc_common::refusals::refused;
use twopc_common::serve::{serve, Endpoint, Response, Serving, Shutdown};
use twopc_schemas::api::ApiError;
use twopc_schemas::protocol::{self, DecideReply, TxWindow, Vote};
use twopc_schemas::{subjects, Code, ParticipantName};

use crate::config::ParticipantArgs;
use crate::ownership::{self};
use crate::resource::Resource;
use crate::store::{library_schema, start_mark};

/// The answer to a message of a kind or version this build does not speak:
/// [`protocol::Unsupported`], listing what it does; nothing is done.
pub(crate) fn unsupported(
    name: &ParticipantName,
    what: &'static str,
    e: &protocol::DecodeError,
) -> Response {
    refused(
        what,
        Code::Unsupported.as_str(),
        || warn!(participant = %name, error = %e, "refused a message this build does not speak"),
    );
    Response::error(
        protocol::encode(&protocol::Unsupported::to(e)),
        Code::Unsupported.status(),
        format!("unsupported: {e}"),
    )
}

/// A running participant's shared state.
pub struct Participant<R: Resource> {
    /// The service's resource logic.
    pub(crate) resource: Arc<R>,
    /// The writer thread of the service's database: prepares, decisions,
    /// recovery and collection.
    pub(crate) db: Db,
    /// Read-only connections to the same database for the public reads
    /// (`<name>.tx`, `<name>.in_doubt`), with their own queue: a flood of
    /// reads never takes a place in the writer's queue.
    pub(crate) reads: ReadDb,
    /// Connection to NATS.
    pub(crate) client: async_nats::Client,
    /// Flags and environment.
    pub(crate) args: ParticipantArgs,
    /// Service-protocol identity and statistics (`nats micro`).
    pub(crate) registry: Arc<Registry>,
    /// This service's shutdown signal (endpoints and recovery stop on it).
    pub(crate) shutdown: Shutdown,
    /// The transaction window and retention (checked at start).
    pub(crate) window: TxWindow,
}

impl<R: Resource> Participant<R> {
    /// Opens (or creates) the database in `args.data_dir`, with the
    /// library's tables; the writer thread starts once the instance owns
    /// its name ([`crate::ownership`]).
    pub fn open_conn(args: &ParticipantArgs, resource: &R) -> anyhow::Result<Connection> {
        std::fs::create_dir_all(&args.data_dir)?;
        let path = args.data_dir.join(format!("{}.db", resource.name()));
        let conn = db::open(&path, resource.migrations())?;
        library_schema(&conn)?;
        Ok(conn)
    }

    pub fn new(
        resource: R,
        db: Db,
        reads: ReadDb,
        client: async_nats::Client,
        args: ParticipantArgs,
        registry: Arc<Registry>,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        let window = args
            .tx_window()
            .expect("the window settings are checked before the service starts");
        Arc::new(Participant {
            resource: Arc::new(resource),
            db,
            reads,
            client,
            args,
            registry,
            shutdown,
            window,
        })
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub(crate) fn name(&self) -> ParticipantName {
        self.resource.name()
    }

    /// Serves the protocol subjects and runs recovery until the client
    /// closes or a task fails.
    pub async fn run(self: Arc<Self>) -> anyhow::Result<()> {
        let name = self.name();
        let queue = subjects::queue_group(name.as_str());
        let busy = |body: Vec<u8>| {
            Response::error(body, 503, format!("busy: {name} is at its in-flight limit"))
        };
        let endpoint = |ep: &'static str, subject: String, busy_reply: Response| Endpoint {
            client: self.client.clone(),
            registry: self.registry.clone(),
            shutdown: self.shutdown.clone(),
            name: ep,
            subject,
            queue: queue.clone(),
            max_inflight: self.args.max_inflight,
            busy: busy_reply,
        };
        let busy_vote = busy(protocol::encode(&Vote::No {
            code: Code::Busy,
            message: format!("{name} is at its in-flight limit"),
        }));
        let busy_decide = busy(protocol::encode(&DecideReply::Rejected {
            code: Code::Busy,
            message: format!("{name} is at its in-flight limit"),
        }));
        let busy_json = refusal(&ApiError::new(Code::Busy, "too many requests in flight"));

        let p = self.clone();
        let prepare = serve(
            endpoint("prepare", subjects::prepare(&name), busy_vote),
            move |msg| {
                let p = p.clone();
                async move { p.on_prepare(msg).await }
            },
        );
        let p = self.clone();
        let decide = serve(
            endpoint("decide", subjects::decide(&name), busy_decide),
            move |msg| {
                let p = p.clone();
                async move { p.on_decide(msg).await }
            },
        );
        let p = self.clone();
        let status = serve(
            endpoint("tx-status", subjects::participant_tx(&name), busy_json),
            move |msg| {
                let p = p.clone();
                async move { p.on_tx_status(msg.payload).await }
            },
        );
        let p = self.clone();
        let in_doubt_busy = refusal(&ApiError::new(Code::Busy, "too many requests in flight"));
        let in_doubt = serve(
            endpoint(
                "in-doubt",
                subjects::participant_in_doubt(&name),
                in_doubt_busy,
            ),
            move |_msg| {
                let p = p.clone();
                async move { Response::json(p.in_doubt().await, refusal) }
            },
        );
        // Every row added from now on gets a larger id than any row now
        // (AUTOINCREMENT), so those up to the largest id now were prepared
        // before this process: read it before the prepare subject is served.
        let started_after_rowid = self.db.run(start_mark).await?;
        let recovery = self.clone().recovery_loop(started_after_rowid);
        let collection = self.clone().collection_loop();
        info!(participant = %name, faults = ?twopc_common::fault::armed(), "participant serving");
        tokio::try_join!(prepare, decide, status, in_doubt, recovery, collection)?;
        Ok(())
    }
}

/// Opens the participant's database, connects to NATS and serves until
/// `stop` resolves (the binary passes SIGTERM/SIGINT) or a failure, then
/// drains. `extra` adds the service's own subjects.
pub async fn run_service<R, F, Fut>(
    args: ParticipantArgs,
    resource: R,
    description: &str,
    extra: F,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()>
where
    R: Resource,
    F: FnOnce(Serving, Db, ReadDb) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let name = resource.name();
    args.tx_window().map_err(anyhow::Error::msg)?;
    let conn = Participant::open_conn(&args, &resource)?;
    let (store, db_epoch) = ownership::store_of(&conn)?;
    if let Some(addr) = args.metrics_addr {
        twopc_common::telemetry::install(addr)?;
    }
    let client = twopc_common::nats::connect(&args.nats_url, name.as_str(), &args.auth).await?;
    tokio::pin!(stop);
    // Serve nothing before owning the name.
    let me = ownership::Me::new(&args.data_dir, store, db_epoch, args.lease_settings());
    let conn = std::sync::Mutex::new(conn);
    let acquire = ownership::Acquire {
        client: &client,
        name: &name,
        data_dir: &args.data_dir,
        me,
        conn: &conn,
    };
    // TWOPC_BREAK=no_owner (tests only): serve at once, unfenced, as every
    // instance did before owners existed; tests prove they catch it.
    let acquire = async {
        if twopc_common::fault::broken("no_owner") {
            warn!(participant = %name, "BROKEN on purpose: serving without owning the name");
            return Ok(ownership::Ownership::unowned(db_epoch));
        }
        acquire.run().await
    };
    let owned = tokio::select! {
        owned = acquire => owned?,
        _ = &mut stop => {
            info!(participant = %name, "stopped before owning the name; exiting");
            return Ok(());
        }
    };
    let fence = owned.fence.clone();
    let conn = conn.into_inner().expect("conn lock");
    let db = Db::start_guarded(conn, name.as_str(), owned.guard());
    let reads = db.reader(name.as_str())?;
    info!(participant = %name, db = %db.path().display(), epoch = fence.epoch(), "database open (WAL, synchronous=FULL; reads on their own connections; writes fenced by the owner epoch)");
    let registry = Arc::new(
        Registry::new(name.as_str(), env!("CARGO_PKG_VERSION"), description)
            .with_metadata("twopc_speaks", twopc_schemas::protocol::speaks_text()),
    );
    let shutdown = Shutdown::new();
    let discovery = registry
        .clone()
        .serve_discovery(client.clone(), shutdown.clone());
    let serving = Serving {
        client: client.clone(),
        registry: registry.clone(),
        shutdown: shutdown.clone(),
    };
    let extra = extra(serving, db.clone(), reads.clone());
    let p = Participant::new(
        resource,
        db,
        reads,
        client.clone(),
        args,
        registry,
        shutdown.clone(),
    );
    let work = async { tokio::try_join!(p.run(), extra, discovery).map(|_| ()) };
    tokio::pin!(work);
    tokio::select! {
        r = &mut work => r,
        why = fence.lost_wait() => {
            // Another instance owns the name now: stop at once; the fence
            // already refuses every write.
            shutdown.begin();
            let _ = client.flush().await;
            anyhow::bail!("{name}: fenced, exiting: {why}")
        }
        _ = &mut stop => {
            info!(participant = %name, "SIGTERM: draining (no new requests; in-flight ones finish)");
            shutdown.begin();
            // Endpoints and recovery return once drained; discovery answers
            // until the end, so stop waiting after the drain bound.
            let _ = tokio::time::timeout(twopc_common::serve::DRAIN_TIMEOUT, &mut work).await;
            let _ = client.flush().await;
            // Let go of the name only after the drain: a standby takes over
            // at once, and nothing here writes any more.
            owned.release().await;
            let _ = client.flush().await;
            info!(participant = %name, "drained; exiting");
            Ok(())
        }
    }
}

/// Serves one public JSON subject of a participant service: `handler`
/// gets the database handle `db` — the writer ([`Db`]) for a create, the
/// readers ([`ReadDb`]) for a read — and the payload, and returns a value
/// or an error reply.
#[allow(clippy::too_many_arguments)]
pub async fn serve_json<D, T, H, F>(
    serving: Serving,
    service: &'static str,
    endpoint: &'static str,
    subject: &'static str,
    db: D,
    max_inflight: usize,
    handler: H,
) -> anyhow::Result<()>
where
    D: Clone + Send + Sync + 'static,
    T: serde::Serialize,
    H: Fn(D, Bytes) -> F + Copy + Send + Sync + 'static,
    F: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
{
    let ep = Endpoint {
        client: serving.client,
        registry: serving.registry,
        shutdown: serving.shutdown,
        name: endpoint,
        subject: subject.into(),
        queue: subjects::queue_group(service),
        max_inflight,
        busy: refusal(&ApiError::new(Code::Busy, "too many requests in flight")),
    };
    serve(ep, move |m| {
        let db = db.clone();
        async move { Response::json(handler(db, m.payload).await, refusal) }
    })
    .await
}

/// Maps a database failure to a public error.
pub fn db_error(e: DbError) -> ApiError {
    match e {
        DbError::Busy => ApiError::new(Code::Busy, "too many requests in flight"),
        DbError::Fenced(why) => ApiError::new(Code::NotOwner, format!("nothing written: {why}")),
        other => ApiError::new(Code::Internal, other.to_string()),
    }
}

/// The reply refusing a request: `{"error": ...}` with the service-protocol
/// error headers.
pub(crate) fn refusal(e: &ApiError) -> Response {
    Response::error(e.to_json(), e.code.status(), e.to_string())
}
