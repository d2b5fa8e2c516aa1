package main

// Strict JSON for the public subjects and the ops, with the Rust services'
// rules (schemas/src/api.rs): a size limit, an object and nothing else,
// no unknown, missing, repeated or mistyped field, integers only as plain
// integer literals, identifiers of 1–64 bytes of [A-Za-z0-9._:@-].

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"

	"twopc/protocol"
)

// Limits of the public API (schemas/src/api.rs).
const (
	MaxRequestBytes = 4 * 1024
	MaxQty          = 1_000_000
	MaxCapacity     = 1_000_000_000 // as MAX_STOCK
	MaxIDBytes      = 64
)

// ApiError is a refused request: {"error": {"code": ..., "message": ...}}.
type ApiError struct {
	Code    protocol.Code
	Message string
}

func (e *ApiError) Error() string { return e.Code.String() + ": " + e.Message }

func (e *ApiError) JSON() []byte {
	b, _ := json.Marshal(map[string]interface{}{"error": map[string]string{"code": e.Code.String(), "message": e.Message}})
	return b
}

func invalid(format string, args ...interface{}) *ApiError {
	return &ApiError{protocol.InvalidRequest, fmt.Sprintf(format, args...)}
}

// fields is a parsed object: each field's raw JSON value.
type fields map[string]json.RawMessage

// parseObject parses a JSON object of at most limit bytes whose keys are
// among allowed, each once.
func parseObject(data []byte, limit int, allowed ...string) (fields, *ApiError) {
	if len(data) > limit {
		return nil, &ApiError{protocol.PayloadTooLarge, fmt.Sprintf("request is %d bytes; the limit is %d", len(data), limit)}
	}
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if !json.Valid(data) {
		return nil, &ApiError{protocol.MalformedJSON, "request is not valid JSON"}
	}
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return nil, invalid("request must be a JSON object")
	}
	d := json.NewDecoder(bytes.NewReader(data))
	d.UseNumber()
	if _, err := d.Token(); err != nil { // {
		return nil, &ApiError{protocol.MalformedJSON, "request is not valid JSON"}
	}
	out := fields{}
	for d.More() {
		t, err := d.Token()
		if err != nil {
			return nil, &ApiError{protocol.MalformedJSON, "request is not valid JSON"}
		}
		key := t.(string)
		ok := false
		for _, a := range allowed {
			ok = ok || a == key
		}
		if !ok {
			return nil, invalid("invalid request: unknown field %q, expected one of %q", key, allowed)
		}
		if _, dup := out[key]; dup {
			return nil, invalid("invalid request: duplicate field %q", key)
		}
		var raw json.RawMessage
		if err := d.Decode(&raw); err != nil {
			return nil, &ApiError{protocol.MalformedJSON, "request is not valid JSON"}
		}
		out[key] = raw
	}
	if _, err := d.Token(); err != nil { // }
		return nil, &ApiError{protocol.MalformedJSON, "request is not valid JSON"}
	}
	if _, err := d.Token(); err != io.EOF {
		return nil, &ApiError{protocol.MalformedJSON, "request is not valid JSON: trailing characters"}
	}
	return out, nil
}

func (f fields) str(name string) (string, *ApiError) {
	raw, ok := f[name]
	if !ok {
		return "", invalid("invalid request: missing field %q", name)
	}
	if len(raw) == 0 || raw[0] != '"' {
		return "", invalid("invalid request: %s must be a string", name)
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", invalid("invalid request: %s must be a string", name)
	}
	return s, nil
}

// id is a string field that is an identifier (checkID).
func (f fields) id(name string) (string, *ApiError) {
	s, e := f.str(name)
	if e != nil {
		return "", e
	}
	return s, checkID(name, s)
}

// uint is an integer field within min..=max.
func (f fields) uint(name string, min, max uint64) (uint64, *ApiError) {
	raw, ok := f[name]
	if !ok {
		return 0, invalid("invalid request: missing field %q", name)
	}
	for _, c := range raw {
		if c < '0' || c > '9' {
			return 0, invalid("invalid request: %s must be a non-negative integer", name)
		}
	}
	n, err := strconv.ParseUint(string(raw), 10, 64)
	if err != nil {
		return 0, invalid("invalid request: %s must be a non-negative integer of at most 64 bits", name)
	}
	if n < min || n > max {
		return 0, invalid("%s must be between %d and %d, got %d", name, min, max, n)
	}
	return n, nil
}

// checkID: 1–64 bytes of [A-Za-z0-9._:@-] (user names, slots).
func checkID(field, v string) *ApiError {
	if len(v) == 0 || len(v) > MaxIDBytes {
		return invalid("%s must be 1 to %d bytes long", field, MaxIDBytes)
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-' || c == ':' || c == '@') {
			return invalid("%s may contain only letters, digits and . _ - : @", field)
		}
	}
	return nil
}

// BookOp is the shipping branch's operation: book qty units of delivery
// slot slot's capacity for user. In a transaction:
// {"participant":"shipping","op":{"user":"al","slot":"2025-06-02-am","qty":1}}.
type BookOp struct {
	User string
	Slot string
	Qty  uint64
}

// ParseOp parses and checks an op as a prepare carries it.
func ParseOp(op []byte) (BookOp, *ApiError) {
	f, e := parseObject(op, protocol.MaxOpBytes, "user", "slot", "qty")
	if e != nil {
		return BookOp{}, e
	}
	var o BookOp
	if o.User, e = f.id("user"); e != nil {
		return o, e
	}
	if o.Slot, e = f.id("slot"); e != nil {
		return o, e
	}
	if o.Qty, e = f.uint("qty", 1, MaxQty); e != nil {
		return o, e
	}
	return o, nil
}
