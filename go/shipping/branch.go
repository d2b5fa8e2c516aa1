package main

// The participant's protocol state machine, without I/O: what to do with a
// prepare or a decision given the stored branch (PROTOCOL.md, "Prepare" and
// "Decide"; the Rust participants' participants/src/branch.rs).

import (
	"bytes"

	"twopc/protocol"
)

// Branch states as stored.
const (
	Prepared  = "prepared"
	Committed = "committed"
	Aborted   = "aborted"
)

// Branch is one stored branch.
type Branch struct {
	State string
	// The op as the prepare carried it; nil for a tombstone.
	Op []byte
	// Why it aborted here, if it did (empty otherwise).
	Code    string
	Message string
}

// OnPrepare is what to do with a prepare: Hold (first prepare within the
// window: ask the resource), or answer Vote and write nothing.
type OnPrepare struct {
	Hold bool
	Vote protocol.Vote
}

// onPrepare: expired says the transaction is past the window.
func onPrepare(stored *Branch, op []byte, expired bool) OnPrepare {
	if stored == nil {
		if expired {
			return OnPrepare{Vote: protocol.Vote{Code: protocol.Expired, Message: "transaction is older than the prepare window"}}
		}
		return OnPrepare{Hold: true}
	}
	switch stored.State {
	case Prepared, Committed:
		if stored.Op != nil && bytes.Equal(stored.Op, op) {
			return OnPrepare{Vote: protocol.Vote{Yes: true}}
		}
		// Same id, other content: forged or corrupt. Never say yes to
		// something that was not prepared.
		return OnPrepare{Vote: protocol.Vote{Code: protocol.Conflict, Message: "transaction id already prepared with another operation"}}
	default: // aborted, tombstone included: the stored reason
		code, ok := protocol.CodeByName(stored.Code)
		if !ok {
			code = protocol.AlreadyAborted
		}
		msg := stored.Message
		if msg == "" {
			msg = "transaction already aborted here"
		}
		return OnPrepare{Vote: protocol.Vote{Code: code, Message: msg}}
	}
}

// What to do with a decision.
type DecideAction int

const (
	// Apply the decision to the prepared branch (commit or abort it).
	Apply DecideAction = iota
	// Already so, or nothing to do: acknowledge, write nothing.
	Ack
	// Abort of a transaction never prepared here, within the window:
	// write a tombstone, acknowledge.
	Tombstone
	// Contradicts the stored state or commits what was never prepared:
	// reject with Code, write nothing.
	Reject
)

type OnDecide struct {
	Action  DecideAction
	Code    protocol.Code
	Message string
}

// onDecide: expired says the transaction is past the window; collectable
// that it is older than the retention less the skew (its decided branch
// may have been collected).
func onDecide(stored *Branch, d protocol.Decision, expired, collectable bool) OnDecide {
	if stored == nil {
		switch {
		case d == protocol.Abort && expired:
			return OnDecide{Action: Ack}
		case d == protocol.Commit && collectable:
			// A commit means this participant voted yes, which it did
			// only durably prepared, and a prepared branch is never
			// collected: it was committed and collected, and the
			// coordinator lost the acknowledgement.
			return OnDecide{Action: Ack}
		case d == protocol.Abort:
			return OnDecide{Action: Tombstone}
		default:
			return OnDecide{Action: Reject, Code: protocol.UnknownTx, Message: "commit for a transaction never prepared here"}
		}
	}
	switch {
	case stored.State == Prepared:
		return OnDecide{Action: Apply}
	case stored.State == Committed && d == protocol.Commit, stored.State == Aborted && d == protocol.Abort:
		return OnDecide{Action: Ack}
	case stored.State == Committed:
		return OnDecide{Action: Reject, Code: protocol.Conflict, Message: "abort for a transaction committed here"}
	default:
		return OnDecide{Action: Reject, Code: protocol.Conflict, Message: "commit for a transaction aborted here"}
	}
}
