package protocol

import "fmt"

// Code is a machine-readable reason (why a vote is no, why a decision or a
// query was refused). On the wire it is its index in CodeNames, a varint;
// in JSON, its name. Indexes are append-only: never reorder, never remove.
type Code uint32

// The codes, by wire index (protocol/codes.json; the tests hold the two
// equal).
var CodeNames = []string{
	"insufficient_funds",  // 0
	"out_of_stock",        // 1
	"price_mismatch",      // 2
	"unknown_user",        // 3
	"unknown_sku",         // 4
	"timeout",             // 5
	"unavailable",         // 6
	"already_aborted",     // 7
	"presumed_abort",      // 8
	"malformed_json",      // 9
	"invalid_request",     // 10
	"payload_too_large",   // 11
	"already_exists",      // 12
	"busy",                // 13
	"bad_message",         // 14
	"conflict",            // 15
	"unknown_tx",          // 16
	"internal",            // 17
	"shutting_down",       // 18
	"outcome_unknown",     // 19
	"expired",             // 20
	"bad_tx_id",           // 21
	"tx_in_future",        // 22
	"wrong_sender",        // 23
	"not_a_branch",        // 24
	"not_owner",           // 25
	"forbidden",           // 26
	"unknown_participant", // 27
	"unsupported",         // 28
}

const (
	InsufficientFunds Code = iota
	OutOfStock
	PriceMismatch
	UnknownUser
	UnknownSku
	Timeout
	Unavailable
	AlreadyAborted
	PresumedAbort
	MalformedJSON
	InvalidRequest
	PayloadTooLarge
	AlreadyExists
	Busy
	BadMessage
	Conflict
	UnknownTx
	Internal
	ShuttingDown
	OutcomeUnknown
	Expired
	BadTxID
	TxInFuture
	WrongSender
	NotABranch
	NotOwner
	Forbidden
	UnknownParticipant
	CodeUnsupported
)

func (c Code) String() string {
	if int(c) < len(CodeNames) {
		return CodeNames[c]
	}
	return fmt.Sprintf("code#%d", uint32(c))
}

// CodeByName parses a code's name.
func CodeByName(name string) (Code, bool) {
	for i, n := range CodeNames {
		if n == name {
			return Code(i), true
		}
	}
	return 0, false
}

// Status is the HTTP-like status an error reply with this code carries in
// the NATS services header `Nats-Service-Error-Code` (as the Rust services
// send it: schemas/src/code.rs, Code::status).
func (c Code) Status() int {
	switch c {
	case UnknownUser, UnknownSku, UnknownTx, UnknownParticipant:
		return 404
	case AlreadyExists, Conflict:
		return 409
	case PayloadTooLarge:
		return 413
	case Busy, ShuttingDown, Unavailable, NotOwner:
		return 503
	case Internal:
		return 500
	case Timeout, OutcomeUnknown:
		return 504
	case Expired:
		return 410
	case WrongSender, NotABranch, Forbidden:
		return 403
	default:
		return 400
	}
}
