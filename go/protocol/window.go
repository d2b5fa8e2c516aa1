package protocol

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strings"
)

// TxID is a transaction id: a UUIDv7 (RFC 9562), whose first 48 bits are
// the milliseconds since the Unix epoch at which its coordinator started
// it.
type TxID [16]byte

// String is the hyphenated lowercase form, 01930000-0000-7000-8000-00000000002a.
func (t TxID) String() string {
	h := hex.EncodeToString(t[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// ParseTxID parses the hyphenated form (or 32 hex digits).
func ParseTxID(s string) (TxID, error) {
	var t TxID
	h := s
	if len(s) == 36 {
		if s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
			return t, fmt.Errorf("%q is not a UUID", s)
		}
		h = strings.ReplaceAll(s, "-", "")
	}
	if len(h) != 32 {
		return t, fmt.Errorf("%q is not a UUID", s)
	}
	b, err := hex.DecodeString(h)
	if err != nil {
		return t, fmt.Errorf("%q is not a UUID", s)
	}
	copy(t[:], b)
	return t, nil
}

// NewV7 makes a UUIDv7 starting at ms, with random bits after.
func NewV7(ms int64) TxID {
	var t TxID
	_, _ = rand.Read(t[6:])
	var ts [8]byte
	binary.BigEndian.PutUint64(ts[:], uint64(ms))
	copy(t[0:6], ts[2:8])
	t[6] = 0x70 | t[6]&0x0f
	t[8] = 0x80 | t[8]&0x3f
	return t
}

// StartedAtMs is when the coordinator that made tx started it; false for an
// id that is not a UUIDv7 of the RFC 9562 variant.
func StartedAtMs(tx TxID) (int64, bool) {
	if tx[6]>>4 != 7 || tx[8]&0xc0 != 0x80 {
		return 0, false
	}
	var ms [8]byte
	copy(ms[2:], tx[0:6])
	return int64(binary.BigEndian.Uint64(ms[:])), true
}

// TxWindow is the transaction window W, the retention H and the tolerated
// clock skew S (PROTOCOL.md, "Window, retention and skew").
type TxWindow struct {
	WindowMs    int64
	RetentionMs int64
	MaxSkewMs   int64
}

// DefaultWindow: W = 5 min, H = 24 h, S = 1 min.
var DefaultWindow = TxWindow{WindowMs: 5 * 60_000, RetentionMs: 24 * 3_600_000, MaxSkewMs: 60_000}

// NewTxWindow checks W > 0, S >= 0, H > W + S and H >= 2W.
func NewTxWindow(windowMs, retentionMs, maxSkewMs int64) (TxWindow, error) {
	if windowMs <= 0 || maxSkewMs < 0 {
		return TxWindow{}, fmt.Errorf("the transaction window must be positive and the skew not negative, got %d ms and %d ms", windowMs, maxSkewMs)
	}
	if retentionMs <= windowMs+maxSkewMs {
		return TxWindow{}, fmt.Errorf("retention (%d ms) must exceed the transaction window (%d ms) plus the tolerated clock skew (%d ms)", retentionMs, windowMs, maxSkewMs)
	}
	if retentionMs < 2*windowMs {
		return TxWindow{}, fmt.Errorf("retention (%d ms) must be at least twice the transaction window (%d ms)", retentionMs, windowMs)
	}
	return TxWindow{windowMs, retentionMs, maxSkewMs}, nil
}

// Refused is why a receiver refuses a message that decoded.
type Refused struct {
	Code    Code
	Message string
}

func (r *Refused) Error() string { return r.Code.String() + ": " + r.Message }

// CheckTx checks a transaction id at the receiver's clock nowMs: a UUIDv7
// (else bad_tx_id) starting at most MaxSkewMs ahead (else tx_in_future).
// expired says whether it is more than WindowMs old.
func (w TxWindow) CheckTx(tx TxID, nowMs int64) (expired bool, refused *Refused) {
	started, ok := StartedAtMs(tx)
	if !ok {
		return false, &Refused{BadTxID, fmt.Sprintf("tx %s is not a UUIDv7 (version %d): its age cannot be known", tx, tx[6]>>4)}
	}
	if ahead := started - nowMs; ahead > w.MaxSkewMs {
		return false, &Refused{TxInFuture, fmt.Sprintf("tx %s starts %d ms in the future, more than the tolerated clock skew of %d ms", tx, ahead, w.MaxSkewMs)}
	}
	return nowMs-started > w.WindowMs, nil
}

// Expired says whether tx is past the window at nowMs (an id that is not a
// UUIDv7 always is).
func (w TxWindow) Expired(tx TxID, nowMs int64) bool {
	started, ok := StartedAtMs(tx)
	return !ok || nowMs-started > w.WindowMs
}

// PastRetention says whether tx is older than the retention at nowMs (an id
// that is not a UUIDv7 always is).
func (w TxWindow) PastRetention(tx TxID, nowMs int64) bool {
	started, ok := StartedAtMs(tx)
	return !ok || nowMs-started > w.RetentionMs
}

// Check is what a participant checks of a prepare (CheckTx).
func (p *Prepare) Check(nowMs int64, w TxWindow) (bool, *Refused) {
	return w.CheckTx(p.Tx, nowMs)
}

// Check is what a participant checks of a decision; stored says whether it
// holds a branch of the transaction. A decision for a stored branch is
// applied whatever the clock says, so tx_in_future is waived for it.
// (Before the store is read, pass true: only impossible ids are refused.)
func (d *Decide) Check(nowMs int64, w TxWindow, stored bool) (bool, *Refused) {
	expired, r := w.CheckTx(d.Tx, nowMs)
	if r != nil && r.Code == TxInFuture && stored {
		return false, nil
	}
	return expired, r
}
