package protocol

import "fmt"

// MaxMessageBytes bounds every protocol message; larger ones are refused
// before decoding.
const MaxMessageBytes = 8 * 1024

// MaxOpBytes bounds a prepare's op.
const MaxOpBytes = 1024

// Message kinds (the envelope's kind byte) and the layout version of each
// kind's body that this package reads and writes.
const (
	KindPrepare       uint8 = 1
	KindVote          uint8 = 2
	KindDecide        uint8 = 3
	KindDecideReply   uint8 = 4
	KindDecisionQuery uint8 = 5
	KindDecisionReply uint8 = 6
	KindUnsupported   uint8 = 7
)

var kindNames = map[uint8]string{
	KindPrepare: "Prepare", KindVote: "Vote", KindDecide: "Decide",
	KindDecideReply: "DecideReply", KindDecisionQuery: "DecisionQuery",
	KindDecisionReply: "DecisionReply", KindUnsupported: "Unsupported",
}

// Versions is the layout version of each kind this package speaks.
var Versions = map[uint8]uint16{
	KindPrepare: 2, KindVote: 1, KindDecide: 1, KindDecideReply: 1,
	KindDecisionQuery: 1, KindDecisionReply: 1, KindUnsupported: 1,
}

// KindName names a kind ("kind 9" if unknown).
func KindName(k uint8) string {
	if n, ok := kindNames[k]; ok {
		return n
	}
	return fmt.Sprintf("kind %d", k)
}

// SpeaksAll lists every kind this package knows with its layout version,
// in kind order: what an Unsupported answer says.
func SpeaksAll() []Speaks {
	var out []Speaks
	for k := KindPrepare; k <= KindUnsupported; k++ {
		out = append(out, Speaks{Kind: k, Version: Versions[k]})
	}
	return out
}

// Decision is the 2PC decision: variant 0 commit, 1 abort.
type Decision uint32

const (
	Commit Decision = 0
	Abort  Decision = 1
)

func (d Decision) String() string {
	switch d {
	case Commit:
		return "commit"
	case Abort:
		return "abort"
	}
	return fmt.Sprintf("decision#%d", uint32(d))
}

// Prepare (kind 1, layout 2): coordinator → participant, phase 1.
type Prepare struct {
	Tx     TxID
	Client string
	Op     []byte
}

// Vote (kind 2, layout 1): the reply to a Prepare. Variant 0 Yes, 1 No.
type Vote struct {
	Yes     bool
	Code    Code
	Message string
}

// Decide (kind 3, layout 1): coordinator → participant, phase 2.
type Decide struct {
	Tx       TxID
	Decision Decision
}

// DecideReply (kind 4, layout 1): variant 0 Ack, 1 Rejected.
type DecideReply struct {
	Ack     bool
	Code    Code
	Message string
}

// DecisionQuery (kind 5, layout 1): participant → coordinator.
type DecisionQuery struct {
	Tx          TxID
	Participant string
}

// DecisionReply (kind 6, layout 1): variant 0 Decided{tx, decision}, 1
// Rejected{code, message}.
type DecisionReply struct {
	Decided  bool
	Tx       TxID
	Decision Decision
	Code     Code
	Message  string
}

// Unsupported (kind 7, layout 1): the answer to a message of a kind or
// version the receiver does not speak.
type Unsupported struct {
	Message string
	Speaks  []Speaks
}

// Speaks is one kind a receiver knows and the layout version it reads.
type Speaks struct {
	Kind    uint8
	Version uint16
}

// Message is any protocol message.
type Message interface {
	Kind() uint8
	body(w *writer)
}

func (Prepare) Kind() uint8       { return KindPrepare }
func (Vote) Kind() uint8          { return KindVote }
func (Decide) Kind() uint8        { return KindDecide }
func (DecideReply) Kind() uint8   { return KindDecideReply }
func (DecisionQuery) Kind() uint8 { return KindDecisionQuery }
func (DecisionReply) Kind() uint8 { return KindDecisionReply }
func (Unsupported) Kind() uint8   { return KindUnsupported }

func (m Prepare) body(w *writer) {
	w.uuid(m.Tx)
	w.str(m.Client)
	w.bytes(m.Op)
}

func (m Vote) body(w *writer) {
	if m.Yes {
		w.variant(0)
		return
	}
	w.variant(1)
	w.u32(uint32(m.Code))
	w.str(m.Message)
}

func (m Decide) body(w *writer) {
	w.uuid(m.Tx)
	w.variant(uint32(m.Decision))
}

func (m DecideReply) body(w *writer) {
	if m.Ack {
		w.variant(0)
		return
	}
	w.variant(1)
	w.u32(uint32(m.Code))
	w.str(m.Message)
}

func (m DecisionQuery) body(w *writer) {
	w.uuid(m.Tx)
	w.str(m.Participant)
}

func (m DecisionReply) body(w *writer) {
	if m.Decided {
		w.variant(0)
		w.uuid(m.Tx)
		w.variant(uint32(m.Decision))
		return
	}
	w.variant(1)
	w.u32(uint32(m.Code))
	w.str(m.Message)
}

func (m Unsupported) body(w *writer) {
	w.str(m.Message)
	w.length(len(m.Speaks))
	for _, s := range m.Speaks {
		w.u8(s.Kind)
		w.u16(s.Version)
	}
}

// Encode writes m in its envelope: its kind's layout version (varint), its
// kind (one byte), its body.
func Encode(m Message) []byte {
	w := &writer{}
	w.u16(Versions[m.Kind()])
	w.u8(m.Kind())
	m.body(w)
	return w.b
}

// Error classes of DecodeError, as the invalid vectors name them.
const (
	ClassTooLarge    = "too_large"
	ClassBody        = "body"
	ClassTrailing    = "trailing"
	ClassInvalid     = "invalid"
	ClassUnsupported = "unsupported"
)

// DecodeError says why bytes are not the expected message. Class
// "unsupported" (another kind where this one was expected, or another
// layout version of it) is answered with Unsupported; the others with a
// bad_message refusal.
type DecodeError struct {
	Class   string
	Message string
	// For class unsupported: the envelope's kind and version.
	Kind    uint8
	Version uint16
}

func (e *DecodeError) Error() string { return e.Message }

// IsUnsupported says whether the sender speaks something this package
// does not.
func (e *DecodeError) IsUnsupported() bool { return e.Class == ClassUnsupported }

// Peek reads the envelope's version and kind without the body.
func Peek(b []byte) (version uint16, kind uint8, ok bool) {
	r := &reader{b: b}
	v, err := r.u16()
	if err != nil {
		return 0, 0, false
	}
	k, err := r.u8()
	if err != nil {
		return 0, 0, false
	}
	return v, k, true
}

// open checks size, envelope, kind and version, in that order (the Rust
// decoder's order), and returns a reader at the body.
func open(b []byte, kind uint8) (*reader, *DecodeError) {
	if len(b) > MaxMessageBytes {
		return nil, &DecodeError{Class: ClassTooLarge, Message: fmt.Sprintf("message of %d bytes exceeds the limit of %d", len(b), MaxMessageBytes)}
	}
	r := &reader{b: b}
	version, err := r.u16()
	if err != nil {
		return nil, bodyErr(err)
	}
	got, err := r.u8()
	if err != nil {
		return nil, &DecodeError{Class: ClassBody, Message: "message does not decode: missing kind"}
	}
	if got != kind {
		return nil, &DecodeError{Class: ClassUnsupported, Kind: got, Version: version,
			Message: fmt.Sprintf("expected a %s message (kind %d), got kind %d", KindName(kind), kind, got)}
	}
	if version != Versions[kind] {
		return nil, &DecodeError{Class: ClassUnsupported, Kind: got, Version: version,
			Message: fmt.Sprintf("unsupported version %d of %s (this build reads version %d)", version, KindName(kind), Versions[kind])}
	}
	return r, nil
}

func bodyErr(err error) *DecodeError {
	return &DecodeError{Class: ClassBody, Message: "message does not decode: " + err.Error()}
}

// done checks that nothing trails the body.
func done(r *reader) *DecodeError {
	if n := r.rest(); n > 0 {
		return &DecodeError{Class: ClassTrailing, Message: fmt.Sprintf("%d trailing bytes after the message", n)}
	}
	return nil
}

// Every Decode* returns *DecodeError as its error (nil when it decoded).

func DecodePrepare(b []byte) (Prepare, error) {
	var m Prepare
	r, de := open(b, KindPrepare)
	if de != nil {
		return m, de
	}
	var err error
	if m.Tx, err = r.uuid(); err != nil {
		return m, bodyErr(err)
	}
	if m.Client, err = r.name("client"); err != nil {
		return m, bodyErr(err)
	}
	if m.Op, err = r.bytes(); err != nil {
		return m, bodyErr(err)
	}
	if de := done(r); de != nil {
		return m, de
	}
	if len(m.Op) > MaxOpBytes {
		return m, &DecodeError{Class: ClassInvalid, Message: fmt.Sprintf("message outside the protocol's limits: op is %d bytes; the limit is %d", len(m.Op), MaxOpBytes)}
	}
	return m, nil
}

// codeAndMessage reads the fields of a No / Rejected variant.
func codeAndMessage(r *reader) (Code, string, error) {
	c, err := r.variant("code", uint32(len(CodeNames)))
	if err != nil {
		return 0, "", err
	}
	s, err := r.str()
	return Code(c), s, err
}

func DecodeVote(b []byte) (Vote, error) {
	var m Vote
	r, de := open(b, KindVote)
	if de != nil {
		return m, de
	}
	v, err := r.variant("vote", 2)
	if err != nil {
		return m, bodyErr(err)
	}
	if v == 0 {
		m.Yes = true
	} else if m.Code, m.Message, err = codeAndMessage(r); err != nil {
		return m, bodyErr(err)
	}
	if de := done(r); de != nil {
		return m, de
	}
	return m, nil
}

func DecodeDecide(b []byte) (Decide, error) {
	var m Decide
	r, de := open(b, KindDecide)
	if de != nil {
		return m, de
	}
	var err error
	if m.Tx, err = r.uuid(); err != nil {
		return m, bodyErr(err)
	}
	d, err := r.variant("decision", 2)
	if err != nil {
		return m, bodyErr(err)
	}
	m.Decision = Decision(d)
	if de := done(r); de != nil {
		return m, de
	}
	return m, nil
}

func DecodeDecideReply(b []byte) (DecideReply, error) {
	var m DecideReply
	r, de := open(b, KindDecideReply)
	if de != nil {
		return m, de
	}
	v, err := r.variant("decide reply", 2)
	if err != nil {
		return m, bodyErr(err)
	}
	if v == 0 {
		m.Ack = true
	} else if m.Code, m.Message, err = codeAndMessage(r); err != nil {
		return m, bodyErr(err)
	}
	if de := done(r); de != nil {
		return m, de
	}
	return m, nil
}

func DecodeDecisionQuery(b []byte) (DecisionQuery, error) {
	var m DecisionQuery
	r, de := open(b, KindDecisionQuery)
	if de != nil {
		return m, de
	}
	var err error
	if m.Tx, err = r.uuid(); err != nil {
		return m, bodyErr(err)
	}
	if m.Participant, err = r.name("participant"); err != nil {
		return m, bodyErr(err)
	}
	if de := done(r); de != nil {
		return m, de
	}
	return m, nil
}

func DecodeDecisionReply(b []byte) (DecisionReply, error) {
	var m DecisionReply
	r, de := open(b, KindDecisionReply)
	if de != nil {
		return m, de
	}
	v, err := r.variant("decision reply", 2)
	if err != nil {
		return m, bodyErr(err)
	}
	if v == 0 {
		m.Decided = true
		if m.Tx, err = r.uuid(); err != nil {
			return m, bodyErr(err)
		}
		d, err := r.variant("decision", 2)
		if err != nil {
			return m, bodyErr(err)
		}
		m.Decision = Decision(d)
	} else if m.Code, m.Message, err = codeAndMessage(r); err != nil {
		return m, bodyErr(err)
	}
	if de := done(r); de != nil {
		return m, de
	}
	return m, nil
}

func DecodeUnsupported(b []byte) (Unsupported, error) {
	var m Unsupported
	r, de := open(b, KindUnsupported)
	if de != nil {
		return m, de
	}
	var err error
	if m.Message, err = r.str(); err != nil {
		return m, bodyErr(err)
	}
	// Each entry is at least 2 bytes, so length() bounds the count too.
	n, err := r.length()
	if err != nil {
		return m, bodyErr(err)
	}
	for i := 0; i < n; i++ {
		var s Speaks
		if s.Kind, err = r.u8(); err != nil {
			return m, bodyErr(err)
		}
		if s.Version, err = r.u16(); err != nil {
			return m, bodyErr(err)
		}
		m.Speaks = append(m.Speaks, s)
	}
	if de := done(r); de != nil {
		return m, de
	}
	return m, nil
}

// UnsupportedFor is the answer to a message that did not decode as
// class unsupported.
func UnsupportedFor(err *DecodeError) Unsupported {
	return Unsupported{Message: err.Message, Speaks: SpeaksAll()}
}
