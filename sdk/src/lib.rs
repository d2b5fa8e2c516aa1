//! # twopc-participant: make any service a two-phase-commit participant
//!
//! A service joins twopc transactions by implementing [`Resource`] — how to
//! read its operation, hold what the operation needs, and apply or release
//! it — against its own SQLite tables, and calling [`run_service`]. The
//! library does everything else: the subjects (`twopc.<name>.prepare`,
//! `twopc.<name>.decide`, queue group `twopc-<name>`), decoding and
//! checking protocol messages (`PROTOCOL.md` at the repository's root),
//! the transaction window,
//! idempotency by transaction id (a repeated prepare gets the same vote, a
//! repeated decision the same acknowledgement), tombstones (an abort before
//! the prepare makes a late prepare vote no), group commit with fsync
//! before every vote and acknowledgement, one owner per name (a lease and a
//! fence), recovery by asking the coordinator about every branch in doubt,
//! retention, drain on SIGTERM, the NATS services protocol (`$SRV`),
//! metrics and logs.
//!
//! ## The one rule your code relies on
//!
//! **`hold`, `apply` and `release` run inside the same SQLite transaction
//! as the library's branch log.** What `hold` writes and the `prepared` row
//! become durable in one fsync, before the yes vote leaves; what `apply`
//! writes and the `committed` row likewise, before the acknowledgement. So
//! holding a resource and recording the vote are one write, and a crash
//! between them cannot happen. Your code never commits, never opens
//! another connection to the file, and never sends messages: it reads and
//! writes through the `conn` it is given.
//!
//! ## A participant in one file
//!
//! A ticket office that sells seats of events: a transaction may book
//! seats together with, say, a payment at the wallet. The op a client
//! writes for it in a transaction's branch is `{"event": "...", "seats": n}`.
//!
//! ```no_run
//! use rusqlite::{params, Connection, OptionalExtension};
//! use serde::Deserialize;
//! use twopc_participant::{run_service, sql_int, Refusal, Resource};
//! use twopc_schemas::{protocol::TxId, ClientName, Code, ParticipantName};
//!
//! /// The operation, as the client writes it in the branch's `op`.
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Book {
//!     event: String,
//!     seats: u64,
//! }
//!
//! struct Tickets;
//!
//! impl Resource for Tickets {
//!     type Op = Book;
//!
//!     fn name(&self) -> ParticipantName {
//!         ParticipantName::new("tickets").unwrap()
//!     }
//!
//!     /// Your tables. Applied once each, in order, at start.
//!     fn migrations(&self) -> &'static [&'static str] {
//!         &["CREATE TABLE events (event TEXT PRIMARY KEY,
//!                                 free INTEGER NOT NULL CHECK (free >= 0));
//!            CREATE TABLE holds (tx BLOB PRIMARY KEY, event TEXT NOT NULL,
//!                                seats INTEGER NOT NULL);"]
//!     }
//!
//!     /// Reads the op (canonical JSON) and checks its limits. An `Err`
//!     /// is a no vote (`bad_message`), and nothing is written.
//!     fn parse_op(&self, op: &str) -> Result<Book, String> {
//!         let book: Book = serde_json::from_str(op).map_err(|e| e.to_string())?;
//!         if book.seats == 0 || book.seats > 10 {
//!             return Err("seats must be 1 to 10".into());
//!         }
//!         Ok(book)
//!     }
//!
//!     /// Phase 1: hold what the op needs, or refuse. A refusal must have
//!     /// written nothing; the library records the no vote.
//!     fn hold(
//!         &self,
//!         conn: &Connection,
//!         tx: TxId,
//!         _client: &ClientName,
//!         op: &Book,
//!     ) -> rusqlite::Result<Result<(), Refusal>> {
//!         let free: Option<i64> = conn
//!             .query_row("SELECT free FROM events WHERE event = ?1", [&op.event], |r| r.get(0))
//!             .optional()?;
//!         let Some(free) = free else {
//!             return Ok(Err((Code::InvalidRequest, format!("no event {}", op.event))));
//!         };
//!         if (free as u64) < op.seats {
//!             return Ok(Err((Code::OutOfStock, format!("{free} seats left"))));
//!         }
//!         conn.execute(
//!             "UPDATE events SET free = free - ?2 WHERE event = ?1",
//!             params![op.event, sql_int(op.seats)?],
//!         )?;
//!         conn.execute(
//!             "INSERT INTO holds (tx, event, seats) VALUES (?1, ?2, ?3)",
//!             params![tx.as_bytes().as_slice(), op.event, sql_int(op.seats)?],
//!         )?;
//!         Ok(Ok(()))
//!     }
//!
//!     /// Commit: the seats are sold. (Called once per branch: the library
//!     /// answers a repeated decision from its log.)
//!     fn apply(&self, conn: &Connection, tx: TxId, _op: &Book) -> rusqlite::Result<()> {
//!         conn.execute("DELETE FROM holds WHERE tx = ?1", [tx.as_bytes().as_slice()])?;
//!         Ok(())
//!     }
//!
//!     /// Abort: give the seats back.
//!     fn release(&self, conn: &Connection, tx: TxId, op: &Book) -> rusqlite::Result<()> {
//!         conn.execute("DELETE FROM holds WHERE tx = ?1", [tx.as_bytes().as_slice()])?;
//!         conn.execute(
//!             "UPDATE events SET free = free + ?2 WHERE event = ?1",
//!             params![op.event, sql_int(op.seats)?],
//!         )?;
//!         Ok(())
//!     }
//! }
//!
//! /// NATS_URL, NATS_NKEY, TWOPC_DATA_DIR, TWOPC_TX_WINDOW_MS, ...: see
//! /// `ParticipantArgs`, or `--help`.
//! #[derive(clap::Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     args: twopc_participant::ParticipantArgs,
//! }
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() -> anyhow::Result<()> {
//!     use clap::Parser;
//!     let args = Cli::parse().args;
//!     twopc_common::logging::init("info", args.log_format);
//!     twopc_common::logging::abort_on_panic();
//!     run_service(
//!         args,
//!         Tickets,
//!         "tickets: seats of events",
//!         // Your own public subjects, if any (see `serve_json`).
//!         |_serving, _db, _reads| async { Ok(()) },
//!         twopc_common::nats::shutdown_signal(),
//!     )
//!     .await
//! }
//! ```
//!
//! Then the coordinator must know the name (`TWOPC_PARTICIPANTS=wallet,order,tickets`),
//! the participant needs its NKey identity (`twopc auth init` makes one per
//! participant the launcher knows), and a client books seats and pays in one
//! transaction:
//!
//! ```text
//! nats req shop.web.transaction '{"branches":[
//!   {"participant":"wallet","op":{"user":"alice","amount":4000}},
//!   {"participant":"tickets","op":{"event":"opera-12-24","seats":2}}],
//!   "request_id":"order-77"}'
//! ```
//!
//! ## What the library promises your code, and what it asks of it
//!
//! * `parse_op` and `hold` run for the first prepare of a transaction only;
//!   a repeated prepare is answered from the branch log. `apply` or
//!   `release` run once, for the decision the coordinator recorded; a
//!   repeated or late decision is answered from the log. Your code need not
//!   be idempotent, and must not try to be clever about it.
//! * A prepare past the transaction window, or for an id already aborted
//!   here, never reaches `hold`.
//! * **Your code fails:** an `Err` or a **panic** in `parse_op`, `hold`,
//!   `apply` or `release` fails that one job: everything it wrote is rolled
//!   back (the job runs in its own savepoint), no yes vote is sent (the
//!   coordinator hears a no vote `internal`, so the transaction aborts),
//!   and the service goes on serving (a panic is caught and logged, even
//!   with [`twopc_common::logging::abort_on_panic`]). A failing `apply` or
//!   `release` leaves the branch prepared; the coordinator delivers again,
//!   and reports the delivery stuck after five refusals. Tested in
//!   `sdk/tests/faulty_resource.rs`.
//! * **Your code is slow:** it runs on the database's one writer thread,
//!   so a slow `hold` delays every prepare and decision behind it. A prepare
//!   not answered within the coordinator's prepare timeout counts as a no
//!   vote there; the hold, once done, is released by the abort that the
//!   coordinator delivers to every participant that did not vote yes in
//!   time. Keep the work to a few SQLite statements.
//! * Money and quantities: SQLite INTEGERs are i64. Convert with
//!   [`sql_int`] (refuses a value that does not fit) and read back with
//!   [`stored_u64`].
//!
//! ## The parts
//!
//! One file per job: [`resource`] (your side), [`prepare`] and [`decide`]
//! (the two phases: the durable job and the subject's handler), [`status`]
//! (public reads), [`background`] (recovery and retention loops),
//! [`store`] (the branch log), [`branch`] (the state machine, pure),
//! [`recovery`] (which branches to ask about, pure), [`ownership`] (one
//! owner per name), [`service`] (subscriptions and lifecycle), [`config`].

pub mod background;
pub mod branch;
pub mod config;
pub mod decide;
pub mod ownership;
pub mod prepare;
pub mod recovery;
pub mod resource;
pub mod service;
pub mod status;
pub mod store;

pub use config::ParticipantArgs;
pub use decide::decide_job;
pub use prepare::prepare_job;
pub use resource::{sql_int, stored_u64, tx_column, Refusal, Resource};
pub use service::{db_error, run_service, serve_json, Participant};
pub use store::{
    branch_states, branches_table, collect_branches, library_schema, list_prepared, load_branch,
    start_mark,
};
