package main

// Public JSON subjects (queue group twopc-<name>, like the Rust wallet's
// wallet.users.create and wallet.balance):
//
//	<name>.slots.create  {"slot": "2025-06-02-am", "capacity": 20} → Slot
//	<name>.slot          {"slot": "2025-06-02-am"}                 → Slot
//	<name>.tx            {"tx": "<uuid>"}   → the branch's state here
//	<name>.in_doubt      {}                 → prepared, undecided branches
//
// A refusal is {"error": {"code": ..., "message": ...}} with the services
// error headers.

import (
	"database/sql"
	"encoding/json"

	"github.com/nats-io/nats.go"

	"twopc/protocol"
)

// Slot is a delivery slot's state.
type Slot struct {
	Slot     string `json:"slot"`
	Capacity int64  `json:"capacity"`
	// Held by prepared, undecided bookings.
	Held int64 `json:"held"`
	// Booked by committed bookings.
	Booked int64 `json:"booked"`
	// capacity − held − booked: what a new booking can take.
	Available int64 `json:"available"`
}

// BranchStatus is <name>.tx's answer (the Rust participants' shape).
type BranchStatus struct {
	Tx          string          `json:"tx"`
	Participant string          `json:"participant"`
	State       string          `json:"state"`
	Code        string          `json:"code,omitempty"`
	Message     string          `json:"message,omitempty"`
	Op          json.RawMessage `json:"op,omitempty"`
	UpdatedAtMs *int64          `json:"updated_at_ms"`
}

type preparedBranch struct {
	Tx           string `json:"tx"`
	PreparedAtMs int64  `json:"prepared_at_ms"`
}

// InDoubt is <name>.in_doubt's answer.
type InDoubt struct {
	Participant string           `json:"participant"`
	Prepared    []preparedBranch `json:"prepared"`
	Truncated   bool             `json:"truncated"`
}

const maxInDoubtListed = 1000

func jsonReply(v interface{}, e *ApiError) Response {
	if e != nil {
		return errorResponse(e.JSON(), e.Code.Status(), e.Error())
	}
	b, err := json.Marshal(v)
	if err != nil {
		e := &ApiError{protocol.Internal, err.Error()}
		return errorResponse(e.JSON(), 500, e.Error())
	}
	return ok(b)
}

func dbError(err error) *ApiError {
	switch err {
	case ErrBusy:
		return &ApiError{protocol.Busy, "too many requests in flight"}
	case ErrClosed:
		return &ApiError{protocol.ShuttingDown, "shutting down"}
	}
	return &ApiError{protocol.Internal, err.Error()}
}

func readSlot(q interface {
	QueryRow(string, ...interface{}) *sql.Row
}, slot string) (*Slot, error) {
	s := Slot{Slot: slot}
	err := q.QueryRow("SELECT capacity, held, booked FROM slots WHERE slot = ?", slot).Scan(&s.Capacity, &s.Held, &s.Booked)
	if err == sql.ErrNoRows {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	s.Available = s.Capacity - s.Held - s.Booked
	return &s, nil
}

func (p *Participant) onCreateSlot(m *nats.Msg) Response {
	f, e := parseObject(m.Data, MaxRequestBytes, "slot", "capacity")
	if e != nil {
		return jsonReply(nil, e)
	}
	slot, e := f.id("slot")
	if e != nil {
		return jsonReply(nil, e)
	}
	capacity, e := f.uint("capacity", 0, MaxCapacity)
	if e != nil {
		return jsonReply(nil, e)
	}
	n, err := p.store.Do(func(t *sql.Tx) (interface{}, error) {
		r, err := t.Exec(`INSERT INTO slots (slot, capacity, created_at_ms) VALUES (?, ?, ?)
			ON CONFLICT DO NOTHING`, slot, int64(capacity), nowMs())
		if err != nil {
			return nil, err
		}
		return r.RowsAffected()
	})
	if err != nil {
		return jsonReply(nil, dbError(err))
	}
	if n.(int64) == 0 {
		return jsonReply(nil, &ApiError{protocol.AlreadyExists, "slot " + quote(slot) + " exists already"})
	}
	info("slot created", "slot", slot, "capacity", capacity)
	return jsonReply(Slot{Slot: slot, Capacity: int64(capacity), Available: int64(capacity)}, nil)
}

func (p *Participant) onSlot(m *nats.Msg) Response {
	f, e := parseObject(m.Data, MaxRequestBytes, "slot")
	if e != nil {
		return jsonReply(nil, e)
	}
	slot, e := f.id("slot")
	if e != nil {
		return jsonReply(nil, e)
	}
	s, err := readSlot(p.store.r, slot)
	if err != nil {
		return jsonReply(nil, dbError(err))
	}
	if s == nil {
		return jsonReply(nil, &ApiError{protocol.UnknownSku, "no delivery slot " + quote(slot)})
	}
	return jsonReply(s, nil)
}

func (p *Participant) onTxStatus(m *nats.Msg) Response {
	f, e := parseObject(m.Data, MaxRequestBytes, "tx")
	if e != nil {
		return jsonReply(nil, e)
	}
	s, e := f.str("tx")
	if e != nil {
		return jsonReply(nil, e)
	}
	tx, err := protocol.ParseTxID(s)
	if err != nil {
		return jsonReply(nil, invalid("tx is not a transaction id: %v", err))
	}
	st := BranchStatus{Tx: tx.String(), Participant: p.cfg.Name, State: "unknown"}
	var op []byte
	var code, message sql.NullString
	var at int64
	err = p.store.r.QueryRow("SELECT state, op, code, message, updated_at_ms FROM branches WHERE tx = ?", tx[:]).
		Scan(&st.State, &op, &code, &message, &at)
	switch {
	case err == sql.ErrNoRows:
	case err != nil:
		return jsonReply(nil, dbError(err))
	default:
		st.Code, st.Message, st.UpdatedAtMs = code.String, message.String, &at
		if op != nil && json.Valid(op) {
			st.Op = op
		}
	}
	return jsonReply(st, nil)
}

func (p *Participant) onInDoubt(m *nats.Msg) Response {
	rows, err := p.store.r.Query(`SELECT tx, prepared_at_ms FROM branches WHERE state = 'prepared'
		ORDER BY prepared_at_ms, tx LIMIT ?`, maxInDoubtListed+1)
	if err != nil {
		return jsonReply(nil, dbError(err))
	}
	defer rows.Close()
	out := InDoubt{Participant: p.cfg.Name, Prepared: []preparedBranch{}}
	for rows.Next() {
		var b []byte
		var at int64
		if err := rows.Scan(&b, &at); err != nil {
			return jsonReply(nil, dbError(err))
		}
		var tx protocol.TxID
		copy(tx[:], b)
		out.Prepared = append(out.Prepared, preparedBranch{tx.String(), at})
	}
	if err := rows.Err(); err != nil {
		return jsonReply(nil, dbError(err))
	}
	if len(out.Prepared) > maxInDoubtListed {
		out.Prepared, out.Truncated = out.Prepared[:maxInDoubtListed], true
	}
	return jsonReply(out, nil)
}

func quote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}
