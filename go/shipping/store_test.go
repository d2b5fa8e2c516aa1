package main

import (
	"database/sql"
	"path/filepath"
	"strings"
	"testing"

	"twopc/protocol"
)

// testParticipant is a participant on a fresh database, without NATS.
func testParticipant(t *testing.T, w protocol.TxWindow) *Participant {
	t.Helper()
	s, err := OpenStore(filepath.Join(t.TempDir(), "shipping.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	cfg := Config{Name: "shipping", Window: w}
	p := &Participant{cfg: cfg, store: s, stopping: make(chan struct{})}
	if _, err := s.Do(func(tx *sql.Tx) (interface{}, error) {
		_, err := tx.Exec("INSERT INTO slots (slot, capacity, created_at_ms) VALUES ('mon-am', 3, 0)")
		return nil, err
	}); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *Participant) prepareNow(t *testing.T, tx protocol.TxID, op string) protocol.Vote {
	t.Helper()
	v, err := p.store.Do(p.prepareJob(protocol.Prepare{Tx: tx, Client: "web", Op: []byte(op)}))
	if err != nil {
		t.Fatal(err)
	}
	return v.(protocol.Vote)
}

func (p *Participant) decideNow(t *testing.T, tx protocol.TxID, d protocol.Decision) protocol.DecideReply {
	t.Helper()
	v, err := p.store.Do(p.decideJob(protocol.Decide{Tx: tx, Decision: d}))
	if err != nil {
		t.Fatal(err)
	}
	return v.(protocol.DecideReply)
}

func (p *Participant) slot(t *testing.T) Slot {
	t.Helper()
	s, err := readSlot(p.store.r, "mon-am")
	if err != nil || s == nil {
		t.Fatalf("slot: %v", err)
	}
	return *s
}

func (p *Participant) branch(t *testing.T, tx protocol.TxID) *Branch {
	t.Helper()
	b, err := loadBranch(p.store.r, tx)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (p *Participant) count(t *testing.T, table string) int {
	var n int
	if err := p.store.r.QueryRow("SELECT count(*) FROM " + table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func vs(v protocol.Vote) string {
	if v.Yes {
		return "yes"
	}
	return "no:" + v.Code.String()
}

func rs(r protocol.DecideReply) string {
	if r.Ack {
		return "ack"
	}
	return "rejected:" + r.Code.String()
}

const op1 = `{"qty":1,"slot":"mon-am","user":"al"}`
const op2 = `{"qty":2,"slot":"mon-am","user":"bo"}`

func TestPrepareHoldsCommitBooksAbortReleases(t *testing.T) {
	p := testParticipant(t, protocol.DefaultWindow)
	a, b := protocol.NewV7(nowMs()), protocol.NewV7(nowMs())
	if v := p.prepareNow(t, a, op1); !v.Yes {
		t.Fatalf("prepare a: %v", v)
	}
	if v := p.prepareNow(t, b, op2); !v.Yes {
		t.Fatalf("prepare b: %v", v)
	}
	if s := p.slot(t); s.Held != 3 || s.Available != 0 {
		t.Fatalf("after two prepares: %+v", s)
	}
	// Full: a third booking votes no, and that no is remembered.
	c := protocol.NewV7(nowMs())
	if v := p.prepareNow(t, c, op1); vs(v) != "no:out_of_stock" {
		t.Fatalf("prepare c: %v", v)
	}
	if got := p.branch(t, c); got.State != Aborted || got.Code != "out_of_stock" {
		t.Fatalf("c stored as %+v", got)
	}
	if r := p.decideNow(t, a, protocol.Commit); !r.Ack {
		t.Fatalf("commit a: %v", r)
	}
	if r := p.decideNow(t, b, protocol.Abort); !r.Ack {
		t.Fatalf("abort b: %v", r)
	}
	if s := p.slot(t); s.Held != 0 || s.Booked != 1 || s.Available != 2 {
		t.Fatalf("after commit and abort: %+v", s)
	}
	// The slot has room again, but c's answer stays no.
	if v := p.prepareNow(t, c, op1); vs(v) != "no:out_of_stock" {
		t.Fatalf("prepare c again: %v", v)
	}
	if n := p.count(t, "bookings"); n != 1 {
		t.Fatalf("%d bookings", n)
	}
	if n := p.count(t, "holds"); n != 0 {
		t.Fatalf("%d holds", n)
	}
	// Idempotent decisions, never flipped.
	for _, c := range []struct {
		tx   protocol.TxID
		d    protocol.Decision
		want string
	}{{a, protocol.Commit, "ack"}, {a, protocol.Abort, "rejected:conflict"}, {b, protocol.Abort, "ack"}, {b, protocol.Commit, "rejected:conflict"}, {c, protocol.Abort, "ack"}} {
		if r := p.decideNow(t, c.tx, c.d); rs(r) != c.want {
			t.Errorf("%s %s: %s, want %s", c.tx, c.d, rs(r), c.want)
		}
	}
	if s := p.slot(t); s.Held != 0 || s.Booked != 1 {
		t.Fatalf("repeats changed the slot: %+v", s)
	}
	// Prepare again after commit: same op yes, other op conflict.
	if v := p.prepareNow(t, a, op1); !v.Yes {
		t.Errorf("prepare a again: %v", v)
	}
	if v := p.prepareNow(t, a, op2); vs(v) != "no:conflict" {
		t.Errorf("prepare a with another op: %v", v)
	}
	if s := p.slot(t); s.Held != 0 || s.Booked != 1 {
		t.Fatalf("repeated prepares changed the slot: %+v", s)
	}
}

func TestUnknownSlotVotesNo(t *testing.T) {
	p := testParticipant(t, protocol.DefaultWindow)
	tx := protocol.NewV7(nowMs())
	v := p.prepareNow(t, tx, `{"qty":1,"slot":"nope","user":"al"}`)
	if vs(v) != "no:unknown_sku" || !strings.Contains(v.Message, "nope") {
		t.Fatalf("%v", v)
	}
}

func TestTombstones(t *testing.T) {
	p := testParticipant(t, protocol.DefaultWindow)
	tx := protocol.NewV7(nowMs())
	if r := p.decideNow(t, tx, protocol.Abort); !r.Ack {
		t.Fatalf("abort before prepare: %v", r)
	}
	b := p.branch(t, tx)
	if b == nil || b.State != Aborted || b.Op != nil || b.Code != "already_aborted" {
		t.Fatalf("tombstone %+v", b)
	}
	if v := p.prepareNow(t, tx, op1); vs(v) != "no:already_aborted" {
		t.Fatalf("late prepare: %v", v)
	}
	if s := p.slot(t); s.Held != 0 {
		t.Fatalf("late prepare held: %+v", s)
	}
	if r := p.decideNow(t, tx, protocol.Commit); rs(r) != "rejected:conflict" {
		t.Fatalf("commit of a tombstone: %v", r)
	}
	// A commit for a branch never prepared is refused.
	other := protocol.NewV7(nowMs())
	if r := p.decideNow(t, other, protocol.Commit); rs(r) != "rejected:unknown_tx" {
		t.Fatalf("commit of nothing: %v", r)
	}
	if p.branch(t, other) != nil {
		t.Fatal("a refused commit wrote a branch")
	}
}

func TestTheWindowAtTheStore(t *testing.T) {
	w, err := protocol.NewTxWindow(1_000, 10_000, 500)
	if err != nil {
		t.Fatal(err)
	}
	p := testParticipant(t, w)
	now := nowMs()
	// Past the window, nothing stored: no expired, nothing written.
	old := protocol.NewV7(now - 2_000)
	if v := p.prepareNow(t, old, op1); vs(v) != "no:expired" {
		t.Fatalf("old prepare: %v", v)
	}
	if p.branch(t, old) != nil || p.slot(t).Held != 0 {
		t.Fatal("an expired prepare wrote")
	}
	// Past the window, an abort of nothing writes no tombstone.
	if r := p.decideNow(t, old, protocol.Abort); !r.Ack || p.branch(t, old) != nil {
		t.Fatalf("old abort: %v %+v", r, p.branch(t, old))
	}
	// Ids that are not UUIDv7, or from the future, are refused.
	v4, _ := protocol.ParseTxID("01930000-0000-4000-8000-00000000002a")
	if v := p.prepareNow(t, v4, op1); vs(v) != "no:bad_tx_id" {
		t.Fatalf("v4: %v", v)
	}
	future := protocol.NewV7(now + 60_000)
	if v := p.prepareNow(t, future, op1); vs(v) != "no:tx_in_future" {
		t.Fatalf("future: %v", v)
	}
	if r := p.decideNow(t, future, protocol.Abort); rs(r) != "rejected:tx_in_future" || p.branch(t, future) != nil {
		t.Fatalf("future abort: %v", r)
	}
	if r := p.decideNow(t, v4, protocol.Abort); rs(r) != "rejected:bad_tx_id" {
		t.Fatalf("v4 abort: %v", r)
	}
	// A branch prepared in the window is still decided after it.
	young := protocol.NewV7(now - 900)
	if v := p.prepareNow(t, young, op1); !v.Yes {
		t.Fatalf("young: %v", v)
	}
	if _, err := p.store.w.Exec("UPDATE branches SET tx = ? WHERE tx = ?", old[:], young[:]); err != nil {
		t.Fatal(err)
	}
	if _, err := p.store.w.Exec("UPDATE holds SET tx = ? WHERE tx = ?", old[:], young[:]); err != nil {
		t.Fatal(err)
	}
	if v := p.prepareNow(t, old, op1); !v.Yes {
		t.Fatalf("stored branch past the window: %v", v)
	}
	if r := p.decideNow(t, old, protocol.Commit); !r.Ack || p.slot(t).Booked != 1 {
		t.Fatalf("commit past the window: %v", r)
	}
	// A commit for a missing branch older than H − S is acknowledged.
	ancient := protocol.NewV7(now - 9_600)
	if r := p.decideNow(t, ancient, protocol.Commit); !r.Ack {
		t.Fatalf("ancient commit: %v", r)
	}
	almost := protocol.NewV7(now - 9_000)
	if r := p.decideNow(t, almost, protocol.Commit); rs(r) != "rejected:unknown_tx" {
		t.Fatalf("commit within H − S: %v", r)
	}
}

func TestCollectionKeepsPreparedBranches(t *testing.T) {
	p := testParticipant(t, protocol.DefaultWindow)
	now := nowMs()
	prepared, committed, tomb := protocol.NewV7(now), protocol.NewV7(now), protocol.NewV7(now)
	p.prepareNow(t, prepared, op1)
	p.prepareNow(t, committed, op1)
	p.decideNow(t, committed, protocol.Commit)
	p.decideNow(t, tomb, protocol.Abort)
	// Everything last changed before now+1 may go but the prepared one.
	n, err := p.store.Do(collectJob(nowMs() + 1))
	if err != nil || n.(int64) != 2 {
		t.Fatalf("collected %v %v", n, err)
	}
	if p.branch(t, prepared) == nil || p.branch(t, committed) != nil || p.branch(t, tomb) != nil {
		t.Fatal("collection took the wrong rows")
	}
	// The booking (business data) stays.
	if p.count(t, "bookings") != 1 {
		t.Fatal("booking collected")
	}
	// Ids keep growing after collection (AUTOINCREMENT): recovery's start
	// mark stays right.
	mark, _ := p.store.StartMark()
	p.prepareNow(t, protocol.NewV7(nowMs()), op1)
	var max int64
	p.store.r.QueryRow("SELECT max(id) FROM branches").Scan(&max)
	if max <= mark {
		t.Fatalf("new id %d at or below the mark %d", max, mark)
	}
}

func TestGroupCommitRollsBackOnlyTheFailingJob(t *testing.T) {
	p := testParticipant(t, protocol.DefaultWindow)
	results := make(chan error, 3)
	for i := 0; i < 3; i++ {
		i := i
		go func() {
			_, err := p.store.Do(func(tx *sql.Tx) (interface{}, error) {
				if i == 1 {
					tx.Exec("INSERT INTO slots (slot, capacity, created_at_ms) VALUES ('x1', 1, 0)")
					return nil, sql.ErrNoRows
				}
				_, err := tx.Exec("INSERT INTO slots (slot, capacity, created_at_ms) VALUES (?, 1, 0)", []string{"x0", "", "x2"}[i])
				return nil, err
			})
			results <- err
		}()
	}
	failed := 0
	for i := 0; i < 3; i++ {
		if <-results != nil {
			failed++
		}
	}
	if failed != 1 || p.count(t, "slots WHERE slot IN ('x0','x2')") != 2 || p.count(t, "slots WHERE slot = 'x1'") != 0 {
		t.Fatalf("failed %d", failed)
	}
}

func TestOpsAreParsedStrictly(t *testing.T) {
	good, bad := ParseOp([]byte(` {"user":"al","slot":"2025-06-02-am","qty":3}` + "\n"))
	if bad != nil || good != (BookOp{"al", "2025-06-02-am", 3}) {
		t.Fatalf("%+v %v", good, bad)
	}
	for _, op := range []string{
		``, `{`, `[]`, `"x"`, `{}`,
		`{"user":"al","slot":"s"}`,
		`{"user":"al","slot":"s","qty":0}`,
		`{"user":"al","slot":"s","qty":1000001}`,
		`{"user":"al","slot":"s","qty":1.0}`,
		`{"user":"al","slot":"s","qty":1e2}`,
		`{"user":"al","slot":"s","qty":-1}`,
		`{"user":"al","slot":"s","qty":"1"}`,
		`{"user":"al","slot":"s","qty":1,"qty":2}`,
		`{"user":"al","slot":"s","qty":1,"extra":true}`,
		`{"user":"a l","slot":"s","qty":1}`,
		`{"user":"","slot":"s","qty":1}`,
		`{"user":"al","slot":"` + strings.Repeat("s", 65) + `","qty":1}`,
		`{"user":"al","slot":"s","qty":1} x`,
		`{"user":"al","slot":"s","qty":99999999999999999999999}`,
	} {
		if o, bad := ParseOp([]byte(op)); bad == nil {
			t.Errorf("%s accepted as %+v", op, o)
		}
	}
	if _, bad := ParseOp([]byte(`{"user":"` + strings.Repeat("a", 1100) + `"}`)); bad == nil || bad.Code != protocol.PayloadTooLarge {
		t.Errorf("a long op: %v", bad)
	}
	_, e := parseObject([]byte(`{"slot":"a"`), MaxRequestBytes, "slot")
	if e == nil || e.Code != protocol.MalformedJSON {
		t.Errorf("malformed: %v", e)
	}
	_, e = parseObject([]byte(`[1]`), MaxRequestBytes, "slot")
	if e == nil || e.Code != protocol.InvalidRequest {
		t.Errorf("array: %v", e)
	}
}

// The op is read only when the table says hold: a stored branch answers
// first; a new transaction with an op this participant cannot read is a
// bad_message no, with nothing written.
func TestAnOpIsReadOnlyToHold(t *testing.T) {
	p := testParticipant(t, protocol.DefaultWindow)
	tx := protocol.NewV7(nowMs())
	if v := p.prepareNow(t, tx, op1); !v.Yes {
		t.Fatal(v)
	}
	if v := p.prepareNow(t, tx, `{"amount":300,"user":"al"}`); vs(v) != "no:conflict" {
		t.Errorf("another op for a stored branch: %v", v)
	}
	fresh := protocol.NewV7(nowMs())
	for _, op := range []string{`{"amount":300,"user":"al"}`, "\xff\xfe", `{"qty":1,"slot":"mon-am","user":"al","x":1}`} {
		if v := p.prepareNow(t, fresh, op); vs(v) != "no:bad_message" {
			t.Errorf("%q: %v", op, v)
		}
	}
	if p.branch(t, fresh) != nil {
		t.Error("an unreadable op was stored")
	}
}
