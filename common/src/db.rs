//! One SQLite database, one writer thread, group commit.
//!
//! Every job runs on the database's own OS thread (never on a tokio worker)
//! inside a `SAVEPOINT`, within an `IMMEDIATE` transaction that the thread
//! shares among all jobs waiting in its queue, up to [`MAX_BATCH`]. One
//! `COMMIT` (one fsync of the WAL, `synchronous=FULL`) then makes the whole
//! batch durable, and only after that does each caller get its result. So a
//! caller that sends a message after `Db::run` returns always announces a
//! durable write, and concurrent callers share the fsync.
//!
//! A job that returns `Err` is rolled back to its savepoint and does not
//! disturb the others in its batch. A failed `COMMIT` is fatal: after a failed
//! fsync the file's state is unknown, so the process aborts and recovers from
//! the log on restart.
//!
//! Reads that the protocol does not depend on (public balance, stock and
//! status queries, in-doubt listings) go through a [`ReadDb`] instead: its
//! own read-only connections on their own threads, with their own bounded
//! queue. A flood of reads can then only make reads `Busy`; it never takes a
//! place in the writer's queue, so prepares and decisions never wait behind
//! it.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::oneshot;

/// Most jobs that share one SQLite transaction and one fsync.
pub const MAX_BATCH: usize = 512;
/// How long a connection waits for another process's lock on the file.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most jobs waiting for the writer thread; past this callers get `Busy`.
pub const MAX_QUEUE: usize = 8192;
/// Reader threads of a [`ReadDb`], each with its own read-only connection:
/// two, so that one long listing does not stop every short read.
pub const READERS: usize = 2;
/// Most read jobs waiting for a [`ReadDb`]'s threads; past this readers get
/// `Busy` (and writers are not affected).
pub const MAX_READ_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The queue is full: the service is overloaded. Nothing was written.
    #[error("database queue is full")]
    Busy,
    /// The job failed and was rolled back; nothing it did was written.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The writer thread is gone (the service is stopping).
    #[error("database is closed")]
    Closed,
    /// The database's [`Guard`] refused the batch this job was in: it was
    /// rolled back and nothing it did was written.
    #[error("not written: {0}")]
    Fenced(String),
}

/// Checked in every batch's write transaction just before its `COMMIT`,
/// with the write lock held since `BEGIN IMMEDIATE`: `Err(why)` rolls the
/// whole batch back and answers each of its jobs [`DbError::Fenced`]. What
/// it reads in the database cannot change before the commit, since no
/// other connection can write meanwhile. A participant's owner lease uses
/// it to fence a writer that lost its lease.
pub type Guard = Box<dyn FnMut(&Connection) -> Result<(), String> + Send>;

type Done = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> Done + Send>;

/// A handle to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    sender: mpsc::SyncSender<Job>,
    path: PathBuf,
}

/// `conn.execute` through the connection's statement cache: SQLite parses
/// each statement once, not on every call.
pub fn exec(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// `conn.query_row` through the statement cache.
pub fn row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, f)
}

/// Opens (creating if needed) a database for durable writes and applies the
/// migrations not yet applied, tracked by `PRAGMA user_version`.
pub fn open(path: &Path, migrations: &[&str]) -> rusqlite::Result<Connection> {
    // One thread owns the connection, so SQLite's own per-call mutexes
    // (the "serialized" mode) are pure overhead.
    let mut conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
            | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(128);
    // WAL with synchronous=FULL: the WAL is fsynced at every COMMIT, so a
    // committed transaction survives a power cut, not only a process kill.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    assert_eq!(mode.to_lowercase(), "wal", "SQLite refused WAL mode");
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    assert_eq!(sync, 2, "synchronous must be FULL");
    migrate(&mut conn, migrations)?;
    Ok(conn)
}

/// Applies the `migrations` that `conn` has not had yet, each in its own
/// transaction, counting them in `PRAGMA user_version`.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> rusqlite::Result<()> {
    let version: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    for (i, sql) in migrations.iter().enumerate().skip(version) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

impl Db {
    /// Starts the writer thread on an opened connection.
    pub fn start(conn: Connection, name: &str) -> Db {
        Db::start_guarded(conn, name, Box::new(|_| Ok(())))
    }

    /// Starts the writer thread with a [`Guard`] checked before every
    /// batch's commit.
    pub fn start_guarded(conn: Connection, name: &str, guard: Guard) -> Db {
        let path = conn.path().map(PathBuf::from).unwrap_or_default();
        let (sender, receiver) = mpsc::sync_channel::<Job>(MAX_QUEUE);
        std::thread::Builder::new()
            .name(format!("db-{name}"))
            .spawn({
                let name = name.to_owned();
                move || writer_loop(conn, receiver, name, guard)
            })
            .expect("spawn db writer thread");
        Db { sender, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer thread inside the current batch and returns
    /// its result once the batch is durable.
    pub async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, DbError>>();
        let job: Job = Box::new(move |conn: &Connection| {
            let result = run_in_savepoint(conn, f);
            Box::new(move |committed: Result<(), String>| {
                let result = match committed {
                    Ok(()) => result.map_err(DbError::from),
                    Err(why) => Err(DbError::Fenced(why)),
                };
                let _ = tx.send(result);
            })
        });
        self.sender.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => DbError::Busy,
            mpsc::TrySendError::Disconnected(_) => DbError::Closed,
        })?;
        rx.await.map_err(|_| DbError::Closed)?
    }
}

/// Read-only connections to a database that a [`Db`] writes, each on its
/// own OS thread, fed by one bounded queue. Cheap to clone.
///
/// What a reader sees is durable: in WAL mode a commit becomes visible to
/// other connections only when the WAL index header is updated, which
/// SQLite does after the WAL is fsynced (`synchronous=FULL`). So a read
/// never reports a state that a crash could take back.
#[derive(Clone)]
pub struct ReadDb {
    sender: mpsc::SyncSender<ReadJob>,
    path: PathBuf,
}

type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

impl ReadDb {
    /// Opens `readers` read-only connections to the database at `path`
    /// (created and migrated by its writer, in WAL mode), sharing a queue of
    /// at most `max_queue` jobs.
    pub fn open(
        path: &Path,
        name: &str,
        readers: usize,
        max_queue: usize,
    ) -> rusqlite::Result<Self> {
        assert!(
            readers > 0 && max_queue > 0,
            "a reader needs a thread and a queue"
        );
        let (sender, receiver) = mpsc::sync_channel::<ReadJob>(max_queue);
        let receiver = std::sync::Arc::new(std::sync::Mutex::new(receiver));
        for i in 0..readers {
            let conn = open_read_only(path)?;
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("db-{name}-read-{i}"))
                .spawn(move || loop {
                    // The lock is held only while waiting for the next job,
                    // never while running one.
                    let job = match receiver.lock().expect("reader queue lock").recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    job(&conn);
                })
                .expect("spawn db reader thread");
        }
        Ok(ReadDb {
            sender,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a reader thread inside one read transaction (so its
    /// statements see one snapshot) and returns its result. `Busy` at once
    /// when [`MAX_READ_QUEUE`] reads are waiting.
    pub async fn run<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T, DbError>>();
        let job: ReadJob = Box::new(move |conn: &Connection| {
            let _ = tx.send(read_transaction(conn, f).map_err(DbError::from));
        });
        self.sender.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => DbError::Busy,
            mpsc::TrySendError::Disconnected(_) => DbError::Closed,
        })?;
        rx.await.map_err(|_| DbError::Closed)?
    }
}

impl Db {
    /// A [`ReadDb`] on this database with the default size
    /// ([`READERS`] threads, [`MAX_READ_QUEUE`] jobs).
    pub fn reader(&self, name: &str) -> rusqlite::Result<ReadDb> {
        ReadDb::open(&self.path, name, READERS, MAX_READ_QUEUE)
    }
}

/// A read-only connection: opened read-only and `query_only`, so no job
/// on it can write, whatever SQL it runs.
fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    conn.execute_batch("PRAGMA query_only=ON;")?;
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    assert_eq!(
        mode.to_lowercase(),
        "wal",
        "a reader needs WAL mode, or it would block the writer"
    );
    Ok(conn)
}

fn read_transaction<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    exec(conn, "BEGIN DEFERRED", [])?;
    let result = f(conn);
    // A read transaction has nothing to keep: end it either way, so that
    // the WAL can be checkpointed past it.
    exec(conn, "ROLLBACK", [])?;
    result
}

fn run_in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    exec(conn, "SAVEPOINT job", [])?;
    match f(conn) {
        Ok(v) => {
            exec(conn, "RELEASE job", [])?;
            Ok(v)
        }
        Err(e) => {
            exec(conn, "ROLLBACK TO job", [])?;
            exec(conn, "RELEASE job", [])?;
            Err(e)
        }
    }
}

fn writer_loop(conn: Connection, receiver: mpsc::Receiver<Job>, name: String, mut guard: Guard) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut done: Vec<Done> = Vec::with_capacity(MAX_BATCH);
    // Blocks until the first job; then takes whatever else is already
    // queued. No timer: under load the queue fills while the previous fsync
    // runs, so batches grow by themselves, and an idle service adds no wait.
    while let Ok(first) = receiver.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(e) = exec(&conn, "BEGIN IMMEDIATE", []) {
            tracing::error!(error = %e, "BEGIN failed; aborting the process");
            std::process::abort();
        }
        let started = std::time::Instant::now();
        let jobs = batch.len();
        for job in batch.drain(..) {
            done.push(job(&conn));
        }
        let exec_us = started.elapsed().as_micros() as u64;
        // Delay point `<name>.commit` (tests only): a slow disk, every
        // batch's fsync taking this much longer.
        if let Some(d) = crate::fault::delay_for(format_args!("{name}.commit")) {
            std::thread::sleep(d);
        }
        if let Err(why) = guard(&conn) {
            if let Err(e) = exec(&conn, "ROLLBACK", []) {
                tracing::error!(error = %e, "ROLLBACK failed; aborting the process");
                std::process::abort();
            }
            crate::refusals::refused(
                "db-guard",
                "fenced",
                || tracing::warn!(jobs, reason = %why, "batch refused by the guard; rolled back"),
            );
            for d in done.drain(..) {
                d(Err(why.clone()));
            }
            continue;
        }
        // The one place where a batch becomes durable: with WAL and
        // synchronous=FULL, COMMIT returns after the WAL is fsynced.
        if let Err(e) = exec(&conn, "COMMIT", []) {
            tracing::error!(error = %e, "COMMIT failed; the log's state is unknown, aborting");
            std::process::abort();
        }
        metrics::histogram!("twopc_log_batch_size", "log" => name.clone()).record(jobs as f64);
        metrics::histogram!("twopc_log_commit_seconds", "log" => name.clone())
            .record(started.elapsed().as_secs_f64() - exec_us as f64 / 1e6);
        tracing::trace!(
            jobs,
            exec_us,
            commit_us = started.elapsed().as_micros() as u64 - exec_us,
            "batch durable"
        );
        for d in done.drain(..) {
            d(Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_commit_and_failed_jobs_roll_back_alone() {
        let dir = tempfile_dir("writer");
        let conn = open(
            &dir.join("t.db"),
            &["CREATE TABLE t (k INTEGER PRIMARY KEY)"],
        )
        .unwrap();
        let db = Db::start(conn, "test");
        let mut handles = vec![];
        for k in 0..100i64 {
            let db = db.clone();
            handles.push(tokio::spawn(async move {
                db.run(move |c| {
                    c.execute("INSERT INTO t (k) VALUES (?1)", [k])?;
                    if k % 10 == 0 {
                        // Fails after writing: must be rolled back alone.
                        c.execute("INSERT INTO t (k) VALUES (?1)", [k])?;
                    }
                    Ok(k)
                })
                .await
            }));
        }
        let mut failed = 0;
        for h in handles {
            if h.await.unwrap().is_err() {
                failed += 1;
            }
        }
        assert_eq!(failed, 10);
        let n: i64 = db
            .run(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(n, 90);
        drop(db);
        // Reopening applies no migration twice and sees the rows.
        let conn = open(
            &dir.join("t.db"),
            &["CREATE TABLE t (k INTEGER PRIMARY KEY)"],
        )
        .unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 90);
    }

    /// A reader sees what the writer made durable, cannot write, and when
    /// its queue is full it answers `Busy` while the writer goes on taking
    /// jobs: reads and writes do not share a queue.
    #[tokio::test]
    async fn a_full_read_queue_refuses_reads_and_leaves_the_writer_alone() {
        let dir = tempfile_dir("reader");
        let conn = open(
            &dir.join("t.db"),
            &["CREATE TABLE t (k INTEGER PRIMARY KEY)"],
        )
        .unwrap();
        let db = Db::start(conn, "test");
        db.run(|c| c.execute("INSERT INTO t (k) VALUES (1)", []))
            .await
            .unwrap();
        // One reader thread, room for one waiting job.
        let reads = ReadDb::open(db.path(), "test", 1, 1).unwrap();
        let count =
            |c: &Connection| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0));
        assert_eq!(reads.run(count).await.unwrap(), 1);
        let write = reads
            .run(|c| c.execute("INSERT INTO t (k) VALUES (2)", []))
            .await;
        assert!(
            matches!(write, Err(DbError::Sqlite(_))),
            "a reader must not write: {:?}",
            write.map(|_| ())
        );

        // Hold the only reader thread, then fill its one queue place.
        let (started, running) = oneshot::channel::<()>();
        let (release, released) = mpsc::channel::<()>();
        let held = tokio::spawn({
            let reads = reads.clone();
            async move {
                reads
                    .run(move |_| {
                        started.send(()).unwrap();
                        released.recv().unwrap();
                        Ok(())
                    })
                    .await
            }
        });
        running.await.unwrap();
        // Polled once, the next read has taken the one queue place.
        let mut queued = Box::pin(reads.run(count));
        assert!(futures::poll!(&mut queued).is_pending());
        assert!(matches!(reads.run(count).await, Err(DbError::Busy)));
        // The writer takes jobs all the same, and they become durable.
        for k in 10..20i64 {
            db.run(move |c| c.execute("INSERT INTO t (k) VALUES (?1)", [k]))
                .await
                .unwrap();
        }
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        // The queued read ran after the writes were durable: it sees them.
        assert_eq!(queued.await.unwrap(), 11);
    }

    /// A guard that refuses rolls the whole batch back and every job in it
    /// hears why; once it lets batches through again they commit.
    #[tokio::test]
    async fn a_refusing_guard_rolls_the_batch_back() {
        let dir = tempfile_dir("guard");
        let conn = open(
            &dir.join("t.db"),
            &["CREATE TABLE t (k INTEGER PRIMARY KEY)"],
        )
        .unwrap();
        let open_gate = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate = open_gate.clone();
        let db = Db::start_guarded(
            conn,
            "guarded",
            Box::new(move |c| {
                let n: i64 = c
                    .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                    .map_err(|e| e.to_string())?;
                assert!(n <= 1, "the guard sees the batch's own writes");
                if gate.load(std::sync::atomic::Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("closed".into())
                }
            }),
        );
        let refused = db
            .run(|c| c.execute("INSERT INTO t (k) VALUES (1)", []))
            .await;
        assert!(matches!(refused, Err(DbError::Fenced(ref why)) if why == "closed"));
        open_gate.store(true, std::sync::atomic::Ordering::SeqCst);
        db.run(|c| c.execute("INSERT INTO t (k) VALUES (2)", []))
            .await
            .unwrap();
        let keys: Vec<i64> = db
            .run(|c| {
                c.prepare("SELECT k FROM t")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .await
            .unwrap();
        assert_eq!(keys, vec![2]);
    }

    fn tempfile_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("twopc-db-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
