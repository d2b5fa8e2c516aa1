//! In-doubt recovery's choice of which prepared branches to ask the
//! coordinator about, without I/O.
//!
//! Each pass the driver lists one bounded page of prepared branches (in
//! transaction-id order, continuing after the previous page and wrapping at
//! the end, so every prepared branch is listed within a bounded number of
//! passes however many there are) and hands it to [`Tracker::select_due`],
//! which returns the branches to ask about now. The driver reports each
//! answer with [`Tracker::record`].
//!
//! **Time is monotonic and passed in.** A branch's age is measured from when
//! this process first listed it, on `std::time::Instant` — the monotonic
//! clock, which stepping the wall clock (NTP, an operator, a VM resume)
//! does not move. The wall-clock `prepared_at_ms` in the database is not an
//! input here at all, so a clock stepped backwards cannot hide a prepared
//! branch and one stepped forwards cannot make a fresh branch look old
//! (asking about a branch still in phase 1 would make the coordinator
//! presume abort). Branches already prepared when the process started are in
//! doubt at once: whoever prepared them is gone.
//!
//! **Fairness.** An unanswered query is retried with its own capped backoff,
//! and among the branches due, the least recently asked go first, at most
//! [`MAX_QUERIES_PER_PASS`] per pass. So a few branches whose resolution
//! keeps failing wait out their backoff and queue behind newer ones, instead
//! of filling every pass as the old oldest-first `LIMIT 1000` let them.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::{Duration, Instant};

use twopc_common::backoff::Backoff;
use twopc_schemas::protocol::TxId;

/// Prepared branches listed from the database per recovery pass.
pub const RECOVERY_PAGE_ROWS: usize = 1_000;
/// Decision queries sent per recovery pass, at most.
pub const MAX_QUERIES_PER_PASS: usize = 256;
/// First retry delay of an unanswered decision query.
pub const RECOVERY_RETRY_BASE_MS: u64 = 100;
/// Largest retry delay, so a long outage is still retried at a steady pace.
pub const RECOVERY_RETRY_CAP_MS: u64 = 10_000;

/// One prepared branch as the driver lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    pub tx: TxId,
    /// Prepared before this process started, so in doubt at once.
    pub before_start: bool,
}

/// What recovery remembers about one prepared branch.
#[derive(Debug, Clone)]
struct Entry {
    /// When this process may first ask about it: when it was first listed,
    /// plus the in-doubt threshold unless it predates the process.
    in_doubt_at: Instant,
    /// Delays between unanswered queries.
    backoff: Backoff,
    /// Earliest next query (after a failed one).
    next_due: Instant,
    /// The last query, for least-recently-asked first; `None` if never.
    last_asked: Option<Instant>,
}

/// Recovery's memory across passes: prepared branches seen and their retry
/// state, and where the next page of the listing starts. Its size is the
/// number of prepared branches in the database, which the coordinator's
/// in-flight limit keeps small in practice.
#[derive(Debug, Default)]
pub struct Tracker {
    entries: BTreeMap<TxId, Entry>,
    /// The last transaction id of the previous page; `None` to start at the
    /// beginning.
    cursor: Option<TxId>,
}

impl Tracker {
    pub fn new() -> Self {
        Tracker::default()
    }

    /// Where the next page of the listing starts: after this id, or at the
    /// beginning.
    pub fn cursor(&self) -> Option<TxId> {
        self.cursor
    }

    /// Prepared branches known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Known prepared branches that are in doubt at `now`.
    pub fn in_doubt(&self, now: Instant) -> usize {
        self.entries
            .values()
            .filter(|e| e.in_doubt_at <= now)
            .count()
    }

    /// Takes in one page of the listing — the prepared branches after
    /// [`Tracker::cursor`] in id order, at most `page_rows` of them — and
    /// returns those to ask about now: in doubt (first listed at least
    /// `threshold` ago, or prepared before this process started), not
    /// waiting out a backoff, least recently asked first, at most
    /// `max_per_pass`.
    pub fn select_due(
        &mut self,
        now: Instant,
        page: &[Listed],
        page_rows: usize,
        threshold: Duration,
        max_per_pass: usize,
    ) -> Vec<TxId> {
        debug_assert!(
            page.windows(2).all(|w| w[0].tx < w[1].tx),
            "page in id order"
        );
        debug_assert!(page.len() <= page_rows);
        let after = self.cursor;
        let full = page.len() >= page_rows;
        // The page covers the ids after the cursor up to its last row, or to
        // the end when it is not full. A known branch in that range that is
        // not listed is no longer prepared: forget it.
        let low = after.map_or(Bound::Unbounded, Bound::Excluded);
        let high = match page.last() {
            Some(last) if full => Bound::Included(last.tx),
            _ => Bound::Unbounded,
        };
        let gone: Vec<TxId> = self
            .entries
            .range((low, high))
            .map(|(tx, _)| *tx)
            .filter(|tx| page.binary_search_by(|l| l.tx.cmp(tx)).is_err())
            .collect();
        for tx in gone {
            self.entries.remove(&tx);
        }
        self.cursor = if full {
            page.last().map(|l| l.tx)
        } else {
            None
        };

        let mut due: Vec<(Option<Instant>, Instant, TxId)> = vec![];
        for l in page {
            let e = self.entries.entry(l.tx).or_insert_with(|| Entry {
                in_doubt_at: if l.before_start { now } else { now + threshold },
                backoff: Backoff::new(RECOVERY_RETRY_BASE_MS, RECOVERY_RETRY_CAP_MS),
                next_due: now,
                last_asked: None,
            });
            if e.in_doubt_at <= now && e.next_due <= now {
                due.push((e.last_asked, e.in_doubt_at, l.tx));
            }
        }
        // Never asked sorts first (`None` < `Some`), then the longest
        // unasked, then the longest in doubt.
        due.sort();
        due.truncate(max_per_pass);
        due.into_iter().map(|(_, _, tx)| tx).collect()
    }

    /// Records the outcome of a query about `tx` made at `now`: resolved
    /// branches are forgotten, the others wait out their next backoff delay.
    pub fn record(&mut self, now: Instant, tx: TxId, resolved: bool) {
        self.record_with(now, tx, resolved, &mut rand::rng());
    }

    /// [`Tracker::record`] with the caller's random source for the backoff
    /// jitter (the simulation's seeded one).
    pub fn record_with(
        &mut self,
        now: Instant,
        tx: TxId,
        resolved: bool,
        rng: &mut impl rand::Rng,
    ) {
        if resolved {
            self.entries.remove(&tx);
        } else if let Some(e) = self.entries.get_mut(&tx) {
            e.last_asked = Some(now);
            e.next_due = now + e.backoff.next_delay_with(rng);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THRESHOLD: Duration = Duration::from_secs(5);
    const MS: Duration = Duration::from_millis(1);

    fn tx(n: u128) -> TxId {
        TxId::from_u128(n)
    }
    fn new(n: u128) -> Listed {
        Listed {
            tx: tx(n),
            before_start: false,
        }
    }
    fn old(n: u128) -> Listed {
        Listed {
            tx: tx(n),
            before_start: true,
        }
    }
    fn pass(t: &mut Tracker, now: Instant, page: &[Listed]) -> Vec<TxId> {
        t.select_due(
            now,
            page,
            RECOVERY_PAGE_ROWS,
            THRESHOLD,
            MAX_QUERIES_PER_PASS,
        )
    }

    #[test]
    fn branches_from_before_start_are_in_doubt_at_once() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        assert_eq!(pass(&mut t, t0, &[old(1), old(2)]), [tx(1), tx(2)]);
    }

    #[test]
    fn a_new_branch_is_in_doubt_threshold_after_it_was_first_listed() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        assert!(pass(&mut t, t0, &[new(1)]).is_empty());
        assert_eq!(t.in_doubt(t0), 0);
        assert!(pass(&mut t, t0 + THRESHOLD - MS, &[new(1)]).is_empty());
        assert_eq!(pass(&mut t, t0 + THRESHOLD, &[new(1)]), [tx(1)]);
        assert_eq!(t.in_doubt(t0 + THRESHOLD), 1);
    }

    /// The wall clock is not an input: `Listed` carries no wall time and the
    /// tracker reads no clock, so only the monotonic `now` passed in moves a
    /// branch towards doubt. Whatever the wall clock did between passes (here:
    /// nothing can even express it), a branch listed at t0 is asked about at
    /// t0 + threshold, and one first listed later is not asked about early.
    #[test]
    fn age_is_monotonic_time_since_first_listed_never_wall_time() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        assert!(pass(&mut t, t0, &[new(1)]).is_empty());
        // A branch first listed later (whatever its wall-clock prepare time
        // says) starts its own count.
        assert!(pass(&mut t, t0 + Duration::from_secs(4), &[new(1), new(2)]).is_empty());
        assert_eq!(
            pass(&mut t, t0 + THRESHOLD, &[new(1), new(2)]),
            [tx(1)],
            "only the first is old enough"
        );
        t.record(t0 + THRESHOLD, tx(1), true);
        assert_eq!(
            pass(&mut t, t0 + Duration::from_secs(9), &[new(2)]),
            [tx(2)]
        );
    }

    #[test]
    fn unanswered_queries_back_off_and_resolved_ones_are_forgotten() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        assert_eq!(pass(&mut t, t0, &[old(1)]), [tx(1)]);
        t.record(t0, tx(1), false);
        // The first delay is jittered within [base/2, base].
        let base = Duration::from_millis(RECOVERY_RETRY_BASE_MS);
        assert!(pass(&mut t, t0 + base / 2 - MS, &[old(1)]).is_empty());
        let t1 = t0 + base;
        assert_eq!(pass(&mut t, t1, &[old(1)]), [tx(1)]);
        t.record(t1, tx(1), false);
        // The second delay is longer: within [base, 2 × base].
        assert!(pass(&mut t, t1 + base - MS, &[old(1)]).is_empty());
        let t2 = t1 + 2 * base;
        assert_eq!(pass(&mut t, t2, &[old(1)]), [tx(1)]);
        // Delays stop growing at the cap.
        let mut now = t2;
        for _ in 0..20 {
            t.record(now, tx(1), false);
            now += Duration::from_millis(RECOVERY_RETRY_CAP_MS);
            assert_eq!(pass(&mut t, now, &[old(1)]), [tx(1)], "due within the cap");
        }
        t.record(now, tx(1), true);
        assert!(t.is_empty());
    }

    #[test]
    fn failing_branches_at_the_head_do_not_starve_a_newer_one() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        let max = 4;
        // Ten old branches whose resolution always fails, listed first.
        let mut page: Vec<Listed> = (1..=10).map(old).collect();
        let mut now = t0;
        for _ in 0..5 {
            for got in t.select_due(now, &page, RECOVERY_PAGE_ROWS, THRESHOLD, max) {
                t.record(now, got, false);
            }
            now += Duration::from_millis(RECOVERY_RETRY_CAP_MS);
        }
        // A newer branch appears after them; it is in doubt one threshold
        // later. Every pass, all ten failing ones are due again too.
        page.push(new(11));
        let appeared = now;
        let mut asked_new_at = None;
        for _ in 0..10 {
            let got = t.select_due(now, &page, RECOVERY_PAGE_ROWS, THRESHOLD, max);
            assert!(got.len() <= max);
            if got.contains(&tx(11)) {
                asked_new_at = Some(now);
                break;
            }
            for g in got {
                t.record(now, g, false);
            }
            now += Duration::from_millis(RECOVERY_RETRY_CAP_MS);
        }
        let at = asked_new_at.expect("the new branch was asked about");
        assert!(
            at <= appeared + THRESHOLD + Duration::from_millis(RECOVERY_RETRY_CAP_MS),
            "asked in the first pass after it became in doubt"
        );
    }

    #[test]
    fn queries_per_pass_are_bounded_and_rotate_through_everyone() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        let page: Vec<Listed> = (1..=10).map(old).collect();
        let mut asked = std::collections::BTreeSet::new();
        let mut now = t0;
        for _ in 0..3 {
            let got = t.select_due(now, &page, RECOVERY_PAGE_ROWS, THRESHOLD, 4);
            assert!(got.len() <= 4);
            for g in &got {
                t.record(now, *g, false);
            }
            asked.extend(got);
            now += Duration::from_millis(RECOVERY_RETRY_CAP_MS);
        }
        assert_eq!(asked.len(), 10, "every branch asked within three passes");
    }

    #[test]
    fn pages_continue_after_the_cursor_wrap_and_forget_what_is_gone() {
        let t0 = Instant::now();
        let mut t = Tracker::new();
        let page_rows = 2;
        let sel = |t: &mut Tracker, page: &[Listed]| {
            t.select_due(t0, page, page_rows, THRESHOLD, MAX_QUERIES_PER_PASS)
        };
        assert_eq!(t.cursor(), None);
        assert_eq!(sel(&mut t, &[old(1), old(2)]), [tx(1), tx(2)]);
        assert_eq!(t.cursor(), Some(tx(2)), "a full page: continue after it");
        assert_eq!(sel(&mut t, &[old(4)]), [tx(4)]);
        assert_eq!(t.cursor(), None, "a short page: wrap to the start");
        assert_eq!(t.len(), 3);
        // Branch 2 was resolved elsewhere (a delivered decision): the next
        // page from the start no longer lists it, and it is forgotten. Branch
        // 4, beyond this full page, is kept.
        sel(&mut t, &[old(1), old(3)]);
        assert_eq!(t.len(), 3, "1, 3 and 4");
        assert_eq!(t.cursor(), Some(tx(3)));
        // The next page is empty: everything after 3 is gone.
        sel(&mut t, &[]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.cursor(), None);
    }
}
