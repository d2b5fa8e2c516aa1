//! The `duplicate` fault: a second instance of a participant, as an
//! operator would start one by mistake or on purpose, while the workload
//! buys. What the participant's ownership lease (`twopc_participants::
//! ownership`) promises, checked here from the instances' logs, their
//! process state and the lease itself:
//!
//! * **fresh** — a duplicate on a new, empty data folder is another store:
//!   it must exit non-zero saying `not serving`, within
//!   [`REFUSAL_BOUND`], and never log that it owns the name (`OWNER`);
//! * **rolling** — a rolling restart: a duplicate on the target's own
//!   folder waits as `STANDBY`; the original is stopped (SIGTERM or
//!   SIGKILL, drawn from the seed) and the duplicate logs `OWNER:`; the
//!   original, started again, waits as `STANDBY`; the duplicate, sent
//!   SIGTERM, exits 0, and the original logs `OWNER:` again.
//!
//! A broken promise is a violation of the run ([`Shared::violation`]).
//! An instance that exits on its own in the middle (fenced, failed) is an
//! unexpected exit, counted like the supervisor's; the fault then gives up
//! and recovers. Every wait polls the logs and processes every [`POLL`]
//! up to a bound. The duplicate is a [`Proc`] owned by the fault, so it
//! is SIGKILLed when the fault ends, however it ends; the original is
//! taken out of the system for the fault ([`Borrowed`]) and put back when
//! it ends, running and owning its name.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use twopc_launcher::{Kind, Proc};
use twopc_schemas::ownership::Lease;
use twopc_schemas::subjects;

use super::Shared;

/// How often a wait looks at the logs and the processes.
const POLL: Duration = Duration::from_millis(50);
/// Longest a fresh duplicate may take to connect, read the lease and
/// exit.
pub(super) const REFUSAL_BOUND: Duration = Duration::from_secs(30);
/// Longest a duplicate on the owner's store may take to say `STANDBY`.
const STANDBY_BOUND: Duration = Duration::from_secs(30);
/// Longest from an owner's stop (its exit after SIGTERM, or SIGKILL) to
/// the standby's `OWNER:`.
const TAKEOVER_BOUND: Duration = Duration::from_secs(30);
/// Longest an owner may take to exit after SIGTERM: its drain
/// (`DRAIN_TIMEOUT`) and the lease's release, with room to spare.
const STOP_BOUND: Duration = Duration::from_secs(twopc_common::serve::DRAIN_TIMEOUT.as_secs() + 20);
/// Longest the original may take to own its name before a rolling
/// restart starts (it may just have been restarted by another fault) and
/// after the fault ends.
const OWN_BOUND: Duration = Duration::from_secs(30);
/// Longest one read of the lease may take.
const LEASE_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Which duplicate, drawn from the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Variant {
    /// On a new, empty data folder: another store.
    Fresh,
    /// On the target's own folder, the original then stopped this way.
    Rolling(Stop),
}

/// How the original is stopped in a rolling restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// It drains, releases its lease and exits 0.
    Sigterm,
    /// It dies holding its lease; the standby on its folder sees the
    /// folder's lock file free.
    Sigkill,
}

impl Variant {
    /// The variant's name in the report's `fault_variants`.
    pub(super) fn name(self) -> &'static str {
        match self {
            Variant::Fresh => "duplicate_fresh",
            Variant::Rolling(Stop::Sigterm) => "duplicate_rolling_sigterm",
            Variant::Rolling(Stop::Sigkill) => "duplicate_rolling_sigkill",
        }
    }
}

/// Runs one duplicate fault on participant service `target`; `n` makes
/// the duplicate's name (`dup-<n>-<target>`: its log file, and the fresh
/// one's data folder, under the run's root).
pub(super) async fn duplicate(shared: &Shared, target: &'static str, n: u64, variant: Variant) {
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.name() == target && k.participant().is_some())
        .expect("the duplicate fault targets a participant");
    let name = format!("dup-{n}-{target}");
    match variant {
        Variant::Fresh => fresh(shared, target, kind, &name).await,
        Variant::Rolling(stop) => rolling(shared, target, kind, &name, stop).await,
    }
}

/// A duplicate on a new, empty folder must refuse to serve and exit.
async fn fresh(shared: &Shared, target: &'static str, kind: Kind, name: &str) {
    let (mut dup, dir) = {
        let mut c = shared.cluster.lock().expect("lock");
        let dir = c.sys.root.join(name);
        (c.sys.duplicate(kind, name, &dir), dir)
    };
    // A kept data folder may hold one from an earlier run: start empty.
    let _ = std::fs::remove_dir_all(&dir);
    let mut log = LogWatch::from_now(dup.log_path());
    shared.say(&format!(
        "nemesis: duplicate {target} on a new, empty data folder ({name}): it must refuse"
    ));
    if let Err(e) = dup.start() {
        shared.say(&format!("nemesis: duplicate {name} did not start: {e:#}"));
        return;
    }
    shared.count_variant(Variant::Fresh.name());
    let started = Instant::now();
    let status = loop {
        // `wait_exit` with no time left: the exit status once it exited.
        if let Ok(status) = dup.wait_exit(Duration::ZERO).await {
            break Some(status);
        }
        if says_owner(log.read()) || started.elapsed() >= REFUSAL_BOUND {
            break None;
        }
        tokio::time::sleep(POLL).await;
    };
    let text = log.read().to_owned();
    let Some(status) = status else {
        let _ = dup.kill();
        let what = if says_owner(&text) {
            "served under the name with another store (it logged OWNER)"
        } else {
            "did not exit"
        };
        shared.violation(format!(
            "duplicate {name} of {target} on a new data folder {what} within {REFUSAL_BOUND:?}; {}",
            excerpt(dup.log_path(), &text)
        ));
        return;
    };
    let elapsed = started.elapsed();
    let success = format!("{:?}", ExitStatus::from_raw(0));
    if status == success || !text.contains(NOT_SERVING) || says_owner(&text) {
        shared.violation(format!(
            "duplicate {name} of {target} on a new data folder exited ({status}) without refusing as it must (non-zero, `{NOT_SERVING}`, never `OWNER`); {}",
            excerpt(dup.log_path(), &text)
        ));
        return;
    }
    shared.timing("refusal", elapsed);
    shared.say(&format!(
        "nemesis: duplicate {name} refused to serve in {} ms",
        elapsed.as_millis()
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Why a rolling restart stopped before its end.
enum Gave {
    /// A promise was broken (already recorded as a violation).
    Violation,
    /// An instance exited on its own (already counted).
    Exit,
    /// The harness could not do its part (said).
    Harness,
}

/// A rolling restart through a duplicate on the target's own folder; see
/// the module. Whatever happens, the duplicate ends killed and the
/// original running and owning its name (a violation if it does not
/// within [`OWN_BOUND`]).
async fn rolling(shared: &Shared, target: &'static str, kind: Kind, name: &str, stop: Stop) {
    let mut original = Borrowed::take(shared, target);
    let mut original_log = LogWatch::from_now(original.log_path());
    if !original.is_running() {
        unexpected(
            shared,
            &format!("{target} was down when the rolling restart began"),
        );
        original_log = restart(shared, &mut original);
    }
    if !owns(shared, target, &mut original, &mut original_log).await {
        shared.say(&format!(
            "nemesis: rolling restart of {target} skipped: it does not own its name"
        ));
        return;
    }
    let (mut dup, dir) = {
        let mut c = shared.cluster.lock().expect("lock");
        let dir = c.sys.data_dir(target);
        (c.sys.duplicate(kind, name, &dir), dir)
    };
    shared.say(&format!(
        "nemesis: rolling restart of {target}: duplicate {name} on its folder {}, then {} the original",
        dir.display(),
        match stop {
            Stop::Sigterm => "SIGTERM",
            Stop::Sigkill => "SIGKILL",
        }
    ));
    let mut dup_log = LogWatch::from_now(dup.log_path());
    match dup.start() {
        Ok(()) => {
            shared.count_variant(Variant::Rolling(stop).name());
            let r = Rolling {
                shared,
                target,
                name,
                original: &mut original,
                original_log: &mut original_log,
                dup: &mut dup,
                dup_log: &mut dup_log,
            };
            if let Err(gave) = r.run(stop).await {
                let why = match gave {
                    Gave::Violation => "a violation",
                    Gave::Exit => "an unexpected exit",
                    Gave::Harness => "a harness failure",
                };
                shared.say(&format!(
                    "nemesis: rolling restart of {target} gave up after {why}; recovering"
                ));
            }
        }
        Err(e) => shared.say(&format!("nemesis: duplicate {name} did not start: {e:#}")),
    }
    // Recover: no duplicate left, the original running and owning.
    let _ = dup.kill();
    if !original.is_running() {
        original_log = restart(shared, &mut original);
    }
    if !owns(shared, target, &mut original, &mut original_log).await {
        shared.violation(format!(
            "{target} did not own its name within {OWN_BOUND:?} after a rolling restart; {}",
            excerpt(original.log_path(), original_log.read())
        ));
    }
}

/// One rolling restart's processes and logs.
struct Rolling<'a> {
    shared: &'a Shared,
    target: &'static str,
    name: &'a str,
    original: &'a mut Proc,
    original_log: &'a mut LogWatch,
    dup: &'a mut Proc,
    dup_log: &'a mut LogWatch,
}

impl Rolling<'_> {
    async fn run(mut self, stop: Stop) -> Result<(), Gave> {
        let (shared, target, name) = (self.shared, self.target, self.name);

        // The duplicate waits while the original owns.
        self.standby_while_owned(Side::Dup).await?;

        // Stop the original; the duplicate takes over.
        let stopped = match stop {
            Stop::Sigterm => {
                let asked = Instant::now();
                match self.original.sigterm_and_wait(STOP_BOUND).await {
                    Ok(status) if status.success() => {
                        shared.timing("drain", asked.elapsed());
                    }
                    Ok(status) => {
                        return Err(self.violation(Side::Original, &format!(
                            "the original {target} exited with {status} after SIGTERM (a drained owner exits 0)"
                        )));
                    }
                    Err(e) => {
                        return Err(self.violation(Side::Original, &format!("{e:#}")));
                    }
                }
                Instant::now()
            }
            Stop::Sigkill => {
                if let Err(e) = self.original.kill() {
                    shared.say(&format!("nemesis: SIGKILL {target} failed: {e:#}"));
                    return Err(Gave::Harness);
                }
                Instant::now()
            }
        };
        let took = self.owner_after(Side::Dup, stopped).await?;
        let key = match stop {
            Stop::Sigterm => "takeover_after_sigterm",
            Stop::Sigkill => "takeover_after_sigkill",
        };
        shared.timing(key, took);
        shared.say(&format!(
            "nemesis: duplicate {name} owns {target} {} ms after the original stopped",
            took.as_millis()
        ));

        // The original, started again on its command line, waits.
        *self.original_log = LogWatch::from_now(self.original.log_path());
        if let Err(e) = self.original.start() {
            shared.say(&format!("nemesis: restarting {target} failed: {e:#}"));
            return Err(Gave::Harness);
        }
        self.standby_while_owned(Side::Original).await?;

        // SIGTERM the duplicate: it drains, lets go, exits 0; the
        // original takes its name back.
        let asked = Instant::now();
        match self.dup.sigterm_and_wait(STOP_BOUND).await {
            Ok(status) if status.success() => {}
            Ok(status) => {
                return Err(self.violation(
                    Side::Dup,
                    &format!(
                    "duplicate {name} exited with {status} after SIGTERM (a drained owner exits 0)"
                ),
                ));
            }
            Err(e) => return Err(self.violation(Side::Dup, &format!("{e:#}"))),
        }
        let took = self.owner_after(Side::Original, asked).await?;
        shared.timing("handback", took);
        shared.say(&format!(
            "nemesis: {target} owns its name again {} ms after SIGTERM to {name}",
            took.as_millis()
        ));
        Ok(())
    }

    fn proc(&mut self, side: Side) -> (&mut Proc, &mut LogWatch) {
        match side {
            Side::Original => (&mut *self.original, &mut *self.original_log),
            Side::Dup => (&mut *self.dup, &mut *self.dup_log),
        }
    }

    fn who(&self, side: Side) -> String {
        match side {
            Side::Original => format!("the original {}", self.target),
            Side::Dup => format!("duplicate {}", self.name),
        }
    }

    /// Records a violation with `side`'s log; the fault gives up.
    fn violation(&mut self, side: Side, what: &str) -> Gave {
        let (p, log) = self.proc(side);
        let path = p.log_path().to_owned();
        let text = log.read().to_owned();
        self.shared.violation(format!(
            "rolling restart of {}: {what}; {}",
            self.target,
            excerpt(&path, &text)
        ));
        Gave::Violation
    }

    /// Counts `side`'s exit as unexpected; the fault gives up.
    fn exited(&mut self, side: Side, when: &str) -> Gave {
        let who = self.who(side);
        let (p, log) = self.proc(side);
        let path = p.log_path().to_owned();
        let text = log.read().to_owned();
        unexpected(
            self.shared,
            &format!("{who} exited {when}; {}", excerpt(&path, &text)),
        );
        Gave::Exit
    }

    /// Waits until `waiting` says `STANDBY` while the other instance owns
    /// the name. `waiting` saying `OWNER:` while the other still runs and
    /// was not fenced is two owners at once.
    async fn standby_while_owned(&mut self, waiting: Side) -> Result<(), Gave> {
        let owner = waiting.other();
        let who = self.who(waiting);
        let deadline = Instant::now() + STANDBY_BOUND;
        loop {
            if !self.proc(owner).0.is_running() {
                let when = format!("while {who} waited to stand by");
                return Err(self.exited(owner, &when));
            }
            let text = self.proc(waiting).1.read();
            if says_owner(text) {
                if self.proc(owner).1.read().contains(FENCED) {
                    // It lost its lease (lapsed): not two owners, but the
                    // owner's exit is unexpected here.
                    let _ = self.proc(owner).0.kill();
                    return Err(
                        self.exited(owner, "fenced, while an instance of its store stood by")
                    );
                }
                let owner_who = self.who(owner);
                return Err(self.violation(
                    waiting,
                    &format!("{who} took the name (OWNER:) while {owner_who} owned it and ran"),
                ));
            }
            if text.contains(STANDBY) {
                return Ok(());
            }
            if !self.proc(waiting).0.is_running() {
                return Err(self.exited(waiting, "instead of standing by"));
            }
            if Instant::now() >= deadline {
                return Err(self.violation(
                    waiting,
                    &format!("{who} neither stood by nor owned within {STANDBY_BOUND:?}"),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `taking` says `OWNER:`; how long since `since`.
    async fn owner_after(&mut self, taking: Side, since: Instant) -> Result<Duration, Gave> {
        let who = self.who(taking);
        loop {
            if says_owner(self.proc(taking).1.read()) {
                return Ok(since.elapsed());
            }
            if !self.proc(taking).0.is_running() {
                return Err(self.exited(taking, "instead of taking over"));
            }
            if since.elapsed() >= TAKEOVER_BOUND {
                return Err(self.violation(
                    taking,
                    &format!("{who} did not take over (OWNER:) within {TAKEOVER_BOUND:?} of the owner's stop"),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// One of a rolling restart's two instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Original,
    Dup,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Original => Side::Dup,
            Side::Dup => Side::Original,
        }
    }
}

/// What the services log (see `twopc_participant::ownership`).
const STANDBY: &str = "STANDBY:";
const FENCED: &str = "FENCED:";
const NOT_SERVING: &str = "not serving";

/// Whether a log says its instance took the name: `OWNER:` with the
/// lease, `OWNER (no JetStream: by asking):` without it. The second is a
/// promise broken too when JetStream is there: an instance that falls
/// back to asking does not see the lease's owner.
fn says_owner(log: &str) -> bool {
    log.contains("OWNER:") || log.contains("OWNER (")
}
/// Counts an exit the nemesis did not ask for, as the supervisor does.
fn unexpected(shared: &Shared, what: &str) {
    shared.unexpected_exits.fetch_add(1, Ordering::Relaxed);
    shared.say(&format!("nemesis: unexpected exit: {what}"));
}

/// Starts the original again (after an exit); a watch of its log from
/// this start.
fn restart(shared: &Shared, original: &mut Proc) -> LogWatch {
    let _ = original.kill();
    let log = LogWatch::from_now(original.log_path());
    if let Err(e) = original.start() {
        shared.say(&format!(
            "nemesis: restarting {} failed: {e:#}",
            original.name
        ));
    }
    log
}

/// Waits up to [`OWN_BOUND`] until the lease names `original`'s process
/// as the owner of `target`; an exit meanwhile is unexpected and the
/// original is started again.
async fn owns(shared: &Shared, target: &str, original: &mut Proc, log: &mut LogWatch) -> bool {
    let deadline = Instant::now() + OWN_BOUND;
    loop {
        if !original.is_running() {
            unexpected(
                shared,
                &format!(
                    "{target} exited while it should own its name; {}",
                    excerpt(original.log_path(), log.read())
                ),
            );
            *log = restart(shared, original);
        }
        let pid = original.pid();
        if pid.is_some() && owner_pid(&shared.client, target).await == pid {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The process id of the live owner of participant `name`, from its lease
/// (read as `twopc owners` would: the admin may read the owners bucket).
async fn owner_pid(client: &async_nats::Client, name: &str) -> Option<u32> {
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(LEASE_READ_TIMEOUT)
        .build(client.clone());
    let stream = js
        .get_stream_no_info(format!("KV_{}", subjects::OWNER_BUCKET))
        .await
        .ok()?;
    let m = stream
        .get_last_raw_message_by_subject(&format!("$KV.{}.{name}", subjects::OWNER_BUCKET))
        .await
        .ok()?;
    if m.headers.get("KV-Operation").is_some() {
        // Deleted or purged.
        return None;
    }
    Lease::parse(&m.payload).ok()?.owner.map(|h| h.pid)
}

/// Service `target`'s process, taken out of the system for a fault that
/// must await on it (a SIGTERM's drain) and put back when this is
/// dropped, however the fault ends. Meanwhile the system holds an
/// unstarted stand-in with the same command line and log, so that a heal
/// would start it.
struct Borrowed<'a> {
    shared: &'a Shared,
    target: &'static str,
    proc: Option<Proc>,
}

impl<'a> Borrowed<'a> {
    fn take(shared: &'a Shared, target: &'static str) -> Self {
        let mut c = shared.cluster.lock().expect("lock");
        let s = c.sys.services.get_mut(target).expect("a service");
        let stand_in = s.proc.duplicate(&s.proc.name, s.proc.log_path().to_owned());
        let proc = std::mem::replace(&mut s.proc, stand_in);
        Borrowed {
            shared,
            target,
            proc: Some(proc),
        }
    }
}

impl std::ops::Deref for Borrowed<'_> {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        self.proc.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Borrowed<'_> {
    fn deref_mut(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("held until dropped")
    }
}

impl Drop for Borrowed<'_> {
    fn drop(&mut self) {
        let (Some(proc), Ok(mut c)) = (self.proc.take(), self.shared.cluster.lock()) else {
            return;
        };
        if let Some(s) = c.sys.services.get_mut(self.target) {
            // The stand-in was never started: dropping it does nothing.
            s.proc = proc;
        }
    }
}

/// A log file read from a point on (a service's log is appended across
/// restarts: a look at one start reads only what it wrote).
struct LogWatch {
    path: PathBuf,
    offset: u64,
    text: String,
}

impl LogWatch {
    /// From the file's current end.
    fn from_now(path: &Path) -> LogWatch {
        LogWatch {
            path: path.to_owned(),
            offset: std::fs::metadata(path).map_or(0, |m| m.len()),
            text: String::new(),
        }
    }

    /// Everything written since the watch began.
    fn read(&mut self) -> &str {
        if let Ok(mut f) = File::open(&self.path) {
            if f.seek(SeekFrom::Start(self.offset)).is_ok() {
                let mut more = vec![];
                if let Ok(n) = f.read_to_end(&mut more) {
                    self.offset += n as u64;
                    self.text.push_str(&String::from_utf8_lossy(&more));
                }
            }
        }
        &self.text
    }
}

/// The last lines of a log, for a violation's message.
fn excerpt(path: &Path, text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(4)..].join(" | ");
    format!("log {} ends: {tail}", path.display())
}
