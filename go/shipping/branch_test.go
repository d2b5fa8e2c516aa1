package main

import (
	"testing"

	"twopc/protocol"
)

var opA = []byte(`{"qty":1,"slot":"mon-am","user":"al"}`)
var opB = []byte(`{"qty":2,"slot":"mon-am","user":"al"}`)

func stored(state string) *Branch { return &Branch{State: state, Op: opA} }

func voteOf(a OnPrepare) string {
	if a.Hold {
		return "hold"
	}
	if a.Vote.Yes {
		return "yes"
	}
	return "no:" + a.Vote.Code.String()
}

// PROTOCOL.md's prepare table, row by row.
func TestThePrepareTable(t *testing.T) {
	tomb := &Branch{State: Aborted, Code: "already_aborted", Message: "aborted before it was prepared here"}
	refusedHere := &Branch{State: Aborted, Op: opA, Code: "out_of_stock", Message: "slot full"}
	cases := []struct {
		name    string
		stored  *Branch
		op      []byte
		expired bool
		want    string
	}{
		{"none, within the window: hold", nil, opA, false, "hold"},
		{"none, past the window: no expired, nothing written", nil, opA, true, "no:expired"},
		{"prepared, same op: yes again", stored(Prepared), opA, false, "yes"},
		{"prepared, same op, past the window: still yes", stored(Prepared), opA, true, "yes"},
		{"prepared, other op: no conflict", stored(Prepared), opB, false, "no:conflict"},
		{"committed, same op: yes again", stored(Committed), opA, true, "yes"},
		{"committed, other op: no conflict", stored(Committed), opB, false, "no:conflict"},
		{"tombstone: no already_aborted", tomb, opA, false, "no:already_aborted"},
		{"aborted by a no vote: the stored reason", refusedHere, opA, false, "no:out_of_stock"},
		{"aborted by a no vote, other op: the stored reason", refusedHere, opB, true, "no:out_of_stock"},
		{"aborted without a code: already_aborted", &Branch{State: Aborted}, opA, false, "no:already_aborted"},
	}
	for _, c := range cases {
		if got := voteOf(onPrepare(c.stored, c.op, c.expired)); got != c.want {
			t.Errorf("%s: %s, want %s", c.name, got, c.want)
		}
	}
	if v := onPrepare(refusedHere, opA, false).Vote; v.Message != "slot full" {
		t.Errorf("stored message %q", v.Message)
	}
	if v := onPrepare(&Branch{State: Aborted}, opA, false).Vote; v.Message != "transaction already aborted here" {
		t.Errorf("default message %q", v.Message)
	}
}

func decideOf(d OnDecide) string {
	switch d.Action {
	case Apply:
		return "apply"
	case Ack:
		return "ack"
	case Tombstone:
		return "tombstone"
	}
	return "reject:" + d.Code.String()
}

// PROTOCOL.md's decide table: every stored state × decision × age.
func TestTheDecideTable(t *testing.T) {
	type age struct{ expired, collectable bool }
	type row struct {
		stored   *Branch
		decision protocol.Decision
		age      age
		want     string
	}
	within, expired, old := age{false, false}, age{true, false}, age{true, true}
	cases := []row{
		{nil, protocol.Commit, within, "reject:unknown_tx"},
		{nil, protocol.Commit, expired, "reject:unknown_tx"},
		{nil, protocol.Commit, old, "ack"},
		{nil, protocol.Abort, within, "tombstone"},
		{nil, protocol.Abort, expired, "ack"},
		{nil, protocol.Abort, old, "ack"},
	}
	// A stored branch answers the same at any age.
	for _, a := range []age{within, expired, old} {
		cases = append(cases,
			row{stored(Prepared), protocol.Commit, a, "apply"},
			row{stored(Prepared), protocol.Abort, a, "apply"},
			row{stored(Committed), protocol.Commit, a, "ack"},
			row{stored(Committed), protocol.Abort, a, "reject:conflict"},
			row{stored(Aborted), protocol.Abort, a, "ack"},
			row{stored(Aborted), protocol.Commit, a, "reject:conflict"},
		)
	}
	for _, c := range cases {
		state := "none"
		if c.stored != nil {
			state = c.stored.State
		}
		if got := decideOf(onDecide(c.stored, c.decision, c.age.expired, c.age.collectable)); got != c.want {
			t.Errorf("%s × %s (expired %v, collectable %v): %s, want %s", state, c.decision, c.age.expired, c.age.collectable, got, c.want)
		}
	}
}
