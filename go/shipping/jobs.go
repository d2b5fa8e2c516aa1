package main

// Phase 1 and phase 2 as jobs of the database writer: each reads the stored
// branch, asks the state machine (branch.go) what to do, and does it in the
// same SQLite transaction as the resource change (the slot's hold, booking
// or release), so both become durable together, before any reply.

import (
	"database/sql"
	"fmt"
	"unicode/utf8"

	"twopc/protocol"
)

// loadBranch reads one branch (nil if none).
func loadBranch(q interface {
	QueryRow(string, ...interface{}) *sql.Row
}, tx protocol.TxID) (*Branch, error) {
	var b Branch
	var code, message sql.NullString
	err := q.QueryRow("SELECT state, op, code, message FROM branches WHERE tx = ?", tx[:]).
		Scan(&b.State, &b.Op, &code, &message)
	if err == sql.ErrNoRows {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	b.Code, b.Message = code.String, message.String
	return &b, nil
}

// refusal is a no vote of the resource: nothing held.
type refusal struct {
	code    protocol.Code
	message string
}

// hold checks the slot's free capacity and holds op.Qty of it for tx.
func hold(t *sql.Tx, tx protocol.TxID, op BookOp) (*refusal, error) {
	var capacity, held, booked int64
	err := t.QueryRow("SELECT capacity, held, booked FROM slots WHERE slot = ?", op.Slot).Scan(&capacity, &held, &booked)
	if err == sql.ErrNoRows {
		// No code names a slot; unknown_sku is the closest in the shared
		// vocabulary (README.md).
		return &refusal{protocol.UnknownSku, fmt.Sprintf("no delivery slot %q", op.Slot)}, nil
	}
	if err != nil {
		return nil, err
	}
	free := capacity - held - booked
	if free < int64(op.Qty) {
		return &refusal{protocol.OutOfStock, fmt.Sprintf("slot %s has %d free, the booking needs %d", op.Slot, free, op.Qty)}, nil
	}
	if _, err := t.Exec("UPDATE slots SET held = held + ? WHERE slot = ?", int64(op.Qty), op.Slot); err != nil {
		return nil, err
	}
	_, err = t.Exec("INSERT INTO holds (tx, slot, user, qty) VALUES (?, ?, ?, ?)", tx[:], op.Slot, op.User, int64(op.Qty))
	return nil, err
}

// settle turns tx's hold into a booking (commit) or releases it (abort).
func settle(t *sql.Tx, tx protocol.TxID, d protocol.Decision, now int64) error {
	var slot, user string
	var qty int64
	if err := t.QueryRow("SELECT slot, user, qty FROM holds WHERE tx = ?", tx[:]).Scan(&slot, &user, &qty); err != nil {
		return fmt.Errorf("the hold of prepared branch %s: %w", tx, err)
	}
	if _, err := t.Exec("DELETE FROM holds WHERE tx = ?", tx[:]); err != nil {
		return err
	}
	if d == protocol.Commit {
		if _, err := t.Exec("UPDATE slots SET held = held - ?1, booked = booked + ?1 WHERE slot = ?2", qty, slot); err != nil {
			return err
		}
		_, err := t.Exec("INSERT INTO bookings (tx, slot, user, qty, booked_at_ms) VALUES (?, ?, ?, ?, ?)", tx[:], slot, user, qty, now)
		return err
	}
	_, err := t.Exec("UPDATE slots SET held = held - ? WHERE slot = ?", qty, slot)
	return err
}

// prepareJob is phase 1 in the writer; it returns the vote to send once the
// batch is durable.
func (p *Participant) prepareJob(msg protocol.Prepare) Job {
	return func(t *sql.Tx) (interface{}, error) {
		now := nowMs()
		// The op is stored as it came, so a repeated prepare is recognised
		// byte for byte (the coordinator sends canonical JSON).
		if !utf8.Valid(msg.Op) {
			return protocol.Vote{Code: protocol.BadMessage, Message: "the op is not UTF-8 JSON"}, nil
		}
		// Checked again inside the write transaction, which also orders
		// this prepare with the collection of old rows: the branch is
		// either here or the prepare is past the window and refused.
		expired, refused := msg.Check(now, p.cfg.Window)
		if refused != nil {
			return protocol.Vote{Code: refused.Code, Message: refused.Message}, nil
		}
		stored, err := loadBranch(t, msg.Tx)
		if err != nil {
			return nil, err
		}
		act := onPrepare(stored, msg.Op, expired)
		if !act.Hold {
			return act.Vote, nil
		}
		op, bad := ParseOp(msg.Op)
		if bad != nil {
			// An op this participant could never apply: a no vote,
			// nothing written (a retry gets the same answer).
			return protocol.Vote{Code: protocol.BadMessage, Message: "shipping cannot read the op: " + bad.Message}, nil
		}
		no, err := hold(t, msg.Tx, op)
		if err != nil {
			return nil, err
		}
		if no == nil {
			_, err = t.Exec(`INSERT INTO branches (tx, state, op, prepared_at_ms, updated_at_ms)
				VALUES (?, 'prepared', ?, ?, ?)`, msg.Tx[:], msg.Op, now, now)
			if err != nil {
				return nil, err
			}
			crashPoint(p.cfg.Name + ".prepare.before_durable")
			return protocol.Vote{Yes: true}, nil
		}
		// Remember the no vote: a repeated prepare gets the same answer
		// even if the slot changed meanwhile.
		_, err = t.Exec(`INSERT INTO branches (tx, state, op, code, message, updated_at_ms)
			VALUES (?, 'aborted', ?, ?, ?, ?)`, msg.Tx[:], msg.Op, no.code.String(), no.message, now)
		if err != nil {
			return nil, err
		}
		crashPoint(p.cfg.Name + ".prepare.before_durable")
		return protocol.Vote{Code: no.code, Message: no.message}, nil
	}
}

// decideJob is phase 2 in the writer (delivery and recovery alike).
func (p *Participant) decideJob(msg protocol.Decide) Job {
	return func(t *sql.Tx) (interface{}, error) {
		now := nowMs()
		stored, err := loadBranch(t, msg.Tx)
		if err != nil {
			return nil, err
		}
		expired, refused := msg.Check(now, p.cfg.Window, stored != nil)
		if refused != nil {
			return protocol.DecideReply{Code: refused.Code, Message: refused.Message}, nil
		}
		// Old enough that a decided branch may have been collected (by
		// this clock, allowing for the skew of the clock that stamped it).
		collectable := p.cfg.Window.PastRetention(msg.Tx, now+p.cfg.Window.MaxSkewMs)
		act := onDecide(stored, msg.Decision, expired, collectable)
		switch act.Action {
		case Ack:
			return protocol.DecideReply{Ack: true}, nil
		case Reject:
			return protocol.DecideReply{Code: act.Code, Message: act.Message}, nil
		case Tombstone:
			_, err := t.Exec(`INSERT INTO branches (tx, state, code, message, updated_at_ms)
				VALUES (?, 'aborted', ?, ?, ?)`, msg.Tx[:], protocol.AlreadyAborted.String(), "aborted before it was prepared here", now)
			if err != nil {
				return nil, err
			}
		case Apply:
			if err := settle(t, msg.Tx, msg.Decision, now); err != nil {
				return nil, err
			}
			state := Committed
			if msg.Decision == protocol.Abort {
				state = Aborted
			}
			if _, err := t.Exec("UPDATE branches SET state = ?, updated_at_ms = ? WHERE tx = ?", state, now, msg.Tx[:]); err != nil {
				return nil, err
			}
		}
		crashPoint(p.cfg.Name + ".decide.before_durable")
		return protocol.DecideReply{Ack: true}, nil
	}
}

// collectJob deletes up to collectBatch decided branches last changed
// before beforeMs; prepared branches are never collected.
const collectBatch = 1000

func collectJob(beforeMs int64) Job {
	return func(t *sql.Tx) (interface{}, error) {
		r, err := t.Exec(`DELETE FROM branches WHERE id IN (
			SELECT id FROM branches WHERE state != 'prepared' AND updated_at_ms < ? LIMIT ?)`, beforeMs, collectBatch)
		if err != nil {
			return nil, err
		}
		n, err := r.RowsAffected()
		return n, err
	}
}
