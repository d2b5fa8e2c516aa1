package main

// The protocol subjects of participant <name> (queue group twopc-<name>):
// twopc.<name>.prepare (Prepare → Vote) and twopc.<name>.decide (Decide →
// DecideReply). PROTOCOL.md says what each must do; this file is that,
// step by step.

import (
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"

	"twopc/protocol"
)

// Participant is the running service's shared state.
type Participant struct {
	cfg   Config
	store *Store
	nc    *nats.Conn
	// Closed when shutdown begins: background loops stop.
	stopping chan struct{}
}

// unsupported answers a message of a kind or layout version this build
// does not speak: Unsupported, listing what it speaks; nothing is done.
func unsupported(de *protocol.DecodeError) Response {
	body := protocol.Encode(protocol.UnsupportedFor(de))
	return errorResponse(body, protocol.CodeUnsupported.Status(), "unsupported: "+de.Message)
}

func (p *Participant) onPrepare(m *nats.Msg) Response {
	msg, err := protocol.DecodePrepare(m.Data)
	if err != nil {
		de := err.(*protocol.DecodeError)
		if de.IsUnsupported() {
			warn("answered a prepare this build does not speak with Unsupported", "participant", p.cfg.Name, "error", de)
			return unsupported(de)
		}
		// Refused before anything is held: a no vote is always safe.
		warn("rejected prepare that does not decode", "participant", p.cfg.Name, "error", de)
		body := protocol.Encode(protocol.Vote{Code: protocol.BadMessage, Message: de.Message})
		return errorResponse(body, 400, "bad_message: "+de.Message)
	}
	// An id that is not a UUIDv7, or from the future: refused before the
	// writer, nothing written. (Past the window is for the write
	// transaction to see: a stored branch still answers.)
	if _, refused := msg.Check(nowMs(), p.cfg.Window); refused != nil {
		warn("refused prepare", "participant", p.cfg.Name, "tx", msg.Tx, "code", refused.Code, "message", refused.Message)
		body := protocol.Encode(protocol.Vote{Code: refused.Code, Message: refused.Message})
		return errorResponse(body, refused.Code.Status(), refused.Error())
	}
	delayPoint(p.cfg.Name + ".prepare")
	v, err := p.store.Do(p.prepareJob(msg))
	var vote protocol.Vote
	switch {
	case err == nil:
		vote = v.(protocol.Vote)
	case errors.Is(err, ErrBusy):
		vote = protocol.Vote{Code: protocol.Busy, Message: p.cfg.Name + "'s log is at its queue limit"}
	case errors.Is(err, ErrClosed):
		vote = protocol.Vote{Code: protocol.ShuttingDown, Message: p.cfg.Name + " is shutting down"}
	case errors.Is(err, ErrNotOwner):
		vote = protocol.Vote{Code: protocol.NotOwner, Message: err.Error()}
	default:
		errorf("prepare failed; voting no", "tx", msg.Tx, "error", err)
		vote = protocol.Vote{Code: protocol.Internal, Message: fmt.Sprintf("%s could not prepare: %v", p.cfg.Name, err)}
	}
	// Durable point: Do returned after the batch holding this prepare
	// was committed (fsynced), so a yes vote announces a durable
	// prepared branch.
	crashPoint(p.cfg.Name + ".prepare.after_durable")
	if vote.Yes {
		info("prepared, voting yes", "participant", p.cfg.Name, "tx", msg.Tx, "client", msg.Client)
	} else {
		info("voting no", "participant", p.cfg.Name, "tx", msg.Tx, "code", vote.Code, "message", vote.Message)
	}
	return ok(protocol.Encode(vote))
}

func (p *Participant) onDecide(m *nats.Msg) Response {
	msg, err := protocol.DecodeDecide(m.Data)
	if err != nil {
		de := err.(*protocol.DecodeError)
		if de.IsUnsupported() {
			warn("answered a decision this build does not speak with Unsupported", "participant", p.cfg.Name, "error", de)
			return unsupported(de)
		}
		warn("rejected decision that does not decode", "participant", p.cfg.Name, "error", de)
		body := protocol.Encode(protocol.DecideReply{Code: protocol.BadMessage, Message: de.Message})
		return errorResponse(body, 400, "bad_message: "+de.Message)
	}
	// Impossible ids only: whether one from the future is refused depends
	// on the stored branch (decideJob).
	if _, refused := msg.Check(nowMs(), p.cfg.Window, true); refused != nil {
		warn("refused decision", "participant", p.cfg.Name, "tx", msg.Tx, "code", refused.Code, "message", refused.Message)
		body := protocol.Encode(protocol.DecideReply{Code: refused.Code, Message: refused.Message})
		return errorResponse(body, refused.Code.Status(), refused.Error())
	}
	delayPoint(p.cfg.Name + ".decide")
	crashPoint(p.cfg.Name + ".decide.before_apply")
	r := p.applyDecision(msg)
	if r.Ack {
		return ok(protocol.Encode(r))
	}
	return errorResponse(protocol.Encode(r), r.Code.Status(), r.Code.String()+": "+r.Message)
}

// applyDecision applies a decision durably (delivery and recovery).
func (p *Participant) applyDecision(msg protocol.Decide) protocol.DecideReply {
	v, err := p.store.Do(p.decideJob(msg))
	var r protocol.DecideReply
	switch {
	case err == nil:
		r = v.(protocol.DecideReply)
	case errors.Is(err, ErrBusy):
		r = protocol.DecideReply{Code: protocol.Busy, Message: p.cfg.Name + "'s log is at its queue limit"}
	case errors.Is(err, ErrClosed):
		r = protocol.DecideReply{Code: protocol.ShuttingDown, Message: p.cfg.Name + " is shutting down"}
	case errors.Is(err, ErrNotOwner):
		r = protocol.DecideReply{Code: protocol.NotOwner, Message: err.Error()}
	default:
		errorf("applying the decision failed", "tx", msg.Tx, "error", err)
		r = protocol.DecideReply{Code: protocol.Internal, Message: err.Error()}
	}
	// Durable point: the decision's effect is fsynced before the
	// acknowledgement leaves.
	crashPoint(p.cfg.Name + ".decide.after_durable")
	if r.Ack {
		info("decision applied", "participant", p.cfg.Name, "tx", msg.Tx, "decision", msg.Decision)
	} else {
		warn("decision rejected", "participant", p.cfg.Name, "tx", msg.Tx, "decision", msg.Decision, "code", r.Code, "message", r.Message)
	}
	return r
}
