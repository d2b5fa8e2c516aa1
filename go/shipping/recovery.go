package main

// In-doubt recovery: a branch prepared and undecided is asked about on
// twopc.decision.<name> — at once if it was prepared before this process
// started, else once it has been listed for InDoubtAfter on the monotonic
// clock — with a capped, jittered backoff per branch, until an answer is
// applied. A Rejected answer, a timeout or no responders means "ask again
// later": a participant never decides a prepared branch on its own.
// And collection: decided branches older than the retention are deleted.

import (
	"math/rand"
	"sort"
	"sync"
	"time"

	"twopc/protocol"
)

const (
	recoveryPageRows  = 1000
	maxQueriesPerPass = 256
	recoveryRetryBase = 100 * time.Millisecond
	recoveryRetryCap  = 10 * time.Second
	queriesInParallel = 32
)

type listed struct {
	tx          protocol.TxID
	beforeStart bool
}

type doubt struct {
	inDoubtAt time.Time
	nextDue   time.Time
	backoff   time.Duration
	lastAsked time.Time // zero: never
}

// tracker remembers prepared branches across passes (the Rust
// participants' recovery.rs, simplified).
type tracker struct {
	entries map[protocol.TxID]*doubt
	cursor  *protocol.TxID
}

func newTracker() *tracker { return &tracker{entries: map[protocol.TxID]*doubt{}} }

func less(a, b protocol.TxID) bool {
	for i := range a {
		if a[i] != b[i] {
			return a[i] < b[i]
		}
	}
	return false
}

// selectDue takes one page of prepared branches (after the cursor, in id
// order) and returns those to ask about now.
func (t *tracker) selectDue(now time.Time, page []listed, threshold time.Duration) []protocol.TxID {
	full := len(page) >= recoveryPageRows
	// Forget known branches in the page's range that it no longer lists.
	inPage := map[protocol.TxID]bool{}
	for _, l := range page {
		inPage[l.tx] = true
	}
	for tx := range t.entries {
		afterCursor := t.cursor == nil || less(*t.cursor, tx)
		beforeEnd := !full || !less(page[len(page)-1].tx, tx)
		if afterCursor && beforeEnd && !inPage[tx] {
			delete(t.entries, tx)
		}
	}
	if full {
		last := page[len(page)-1].tx
		t.cursor = &last
	} else {
		t.cursor = nil
	}
	type cand struct {
		tx        protocol.TxID
		lastAsked time.Time
	}
	var due []cand
	for _, l := range page {
		e, ok := t.entries[l.tx]
		if !ok {
			at := now.Add(threshold)
			if l.beforeStart {
				at = now
			}
			e = &doubt{inDoubtAt: at, backoff: recoveryRetryBase}
			t.entries[l.tx] = e
		}
		if !now.Before(e.inDoubtAt) && !now.Before(e.nextDue) {
			due = append(due, cand{l.tx, e.lastAsked})
		}
	}
	// Least recently asked first (never asked first of all).
	sort.SliceStable(due, func(i, j int) bool { return due[i].lastAsked.Before(due[j].lastAsked) })
	if len(due) > maxQueriesPerPass {
		due = due[:maxQueriesPerPass]
	}
	out := make([]protocol.TxID, len(due))
	for i, c := range due {
		out[i] = c.tx
	}
	return out
}

// record notes the outcome of one query.
func (t *tracker) record(now time.Time, tx protocol.TxID, resolved bool) {
	e, ok := t.entries[tx]
	if !ok {
		return
	}
	if resolved {
		delete(t.entries, tx)
		return
	}
	e.lastAsked = now
	jitter := time.Duration(rand.Int63n(int64(e.backoff)/2 + 1))
	e.nextDue = now.Add(e.backoff/2 + jitter)
	e.backoff *= 2
	if e.backoff > recoveryRetryCap {
		e.backoff = recoveryRetryCap
	}
}

// listPrepared reads one page of prepared branches after `after`.
func (p *Participant) listPrepared(after *protocol.TxID, mark int64) ([]listed, error) {
	from := []byte{}
	if after != nil {
		from = after[:]
	}
	rows, err := p.store.r.Query(`SELECT tx, id <= ? FROM branches
		WHERE state = 'prepared' AND tx > ? ORDER BY tx LIMIT ?`, mark, from, recoveryPageRows)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []listed
	for rows.Next() {
		var b []byte
		var before bool
		if err := rows.Scan(&b, &before); err != nil {
			return nil, err
		}
		var l listed
		copy(l.tx[:], b)
		l.beforeStart = before
		out = append(out, l)
	}
	return out, rows.Err()
}

func (p *Participant) recoveryLoop(mark int64, wg *sync.WaitGroup) {
	defer wg.Done()
	t := newTracker()
	for {
		page, err := p.listPrepared(t.cursor, mark)
		var due []protocol.TxID
		if err != nil {
			warn("could not list in-doubt branches", "participant", p.cfg.Name, "error", err)
		} else {
			due = t.selectDue(time.Now(), page, p.cfg.InDoubtAfter)
		}
		if len(due) > 0 {
			info("resolving in-doubt transactions", "participant", p.cfg.Name, "count", len(due))
			results := make([]bool, len(due))
			sem := make(chan struct{}, queriesInParallel)
			var qwg sync.WaitGroup
			for i, tx := range due {
				i, tx := i, tx
				qwg.Add(1)
				sem <- struct{}{}
				go func() {
					defer func() { <-sem; qwg.Done() }()
					results[i] = p.resolveInDoubt(tx)
				}()
			}
			qwg.Wait()
			now := time.Now()
			for i, tx := range due {
				t.record(now, tx, results[i])
			}
		}
		select {
		case <-time.After(p.cfg.RecoveryEvery):
		case <-p.stopping:
			return
		}
	}
}

// resolveInDoubt asks the coordinator once and applies the answer; true
// when the branch is decided here now.
func (p *Participant) resolveInDoubt(tx protocol.TxID) bool {
	query := protocol.Encode(protocol.DecisionQuery{Tx: tx, Participant: p.cfg.Name})
	m, err := p.nc.Request(protocol.DecisionQuerySubject(p.cfg.Name), query, p.cfg.DecisionTimeout)
	if err != nil {
		// A timeout is "unknown": ask again later, never guess.
		warn("decision query unanswered; will retry", "participant", p.cfg.Name, "tx", tx, "error", err)
		return false
	}
	reply, err := protocol.DecodeDecisionReply(m.Data)
	if err != nil {
		if _, kind, ok := protocol.Peek(m.Data); ok && kind == protocol.KindUnsupported {
			if u, err := protocol.DecodeUnsupported(m.Data); err == nil {
				warn("the coordinator does not speak this decision query; will retry", "participant", p.cfg.Name, "tx", tx, "message", u.Message, "speaks", u.Speaks)
				return false
			}
		}
		warn("decision reply does not decode; will retry", "participant", p.cfg.Name, "tx", tx, "error", err)
		return false
	}
	if !reply.Decided {
		warn("decision query refused; will retry", "participant", p.cfg.Name, "tx", tx, "code", reply.Code, "message", reply.Message)
		return false
	}
	if reply.Tx != tx {
		errorf("decision reply for another transaction; ignored", "participant", p.cfg.Name, "tx", tx, "got", reply.Tx)
		return false
	}
	info("in-doubt transaction resolved by the coordinator", "participant", p.cfg.Name, "tx", tx, "decision", reply.Decision)
	crashPoint(p.cfg.Name + ".recover.before_apply")
	return p.applyDecision(protocol.Decide{Tx: tx, Decision: reply.Decision}).Ack
}

// collectionLoop deletes decided branches older than the retention, every
// tenth of the retention (between 100 ms and a minute).
func (p *Participant) collectionLoop(wg *sync.WaitGroup) {
	defer wg.Done()
	every := time.Duration(p.cfg.Window.RetentionMs/10) * time.Millisecond
	if every < 100*time.Millisecond {
		every = 100 * time.Millisecond
	}
	if every > time.Minute {
		every = time.Minute
	}
	for {
		select {
		case <-time.After(every):
		case <-p.stopping:
			return
		}
		before := nowMs() - p.cfg.Window.RetentionMs
		for {
			n, err := p.store.Do(collectJob(before))
			if err != nil {
				warn("collecting old branches failed; will retry", "participant", p.cfg.Name, "error", err)
				break
			}
			if n.(int64) > 0 {
				info("collected decided branches past retention", "participant", p.cfg.Name, "rows", n)
			}
			if n.(int64) < collectBatch {
				break
			}
		}
	}
}
