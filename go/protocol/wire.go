// Package protocol is twopc's coordinator ↔ participant wire protocol in Go:
// the postcard encoding of each message inside its versioned envelope,
// written by hand from PROTOCOL.md (repository root) and checked against the
// golden vectors in protocol/vectors.
//
// Postcard in brief (PROTOCOL.md, "Encoding"): unsigned integers wider than
// a byte are varints (7 bits a byte, least significant group first, high bit
// set on every byte but the last); a u8 is one raw byte; a string or a byte
// vector is a varint length and the bytes; a UUID is 16 length-prefixed
// bytes; an enum is a varint variant index followed by that variant's
// fields; a struct is its fields in order, with no names or tags.
package protocol

import (
	"fmt"
	"unicode/utf8"
)

// Longest varint of each width, and the largest value its last byte may
// hold (postcard refuses a last byte that would overflow the width).
const (
	maxBytesU16 = 3
	lastMaxU16  = 0x03
	maxBytesU32 = 5
	lastMaxU32  = 0x0f
	maxBytesU64 = 10
	lastMaxU64  = 0x01
)

// appendVarint appends v as a postcard varint (shortest form).
func appendVarint(b []byte, v uint64) []byte {
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

// writer builds a message body.
type writer struct{ b []byte }

func (w *writer) u8(v uint8)       { w.b = append(w.b, v) }
func (w *writer) u16(v uint16)     { w.b = appendVarint(w.b, uint64(v)) }
func (w *writer) u32(v uint32)     { w.b = appendVarint(w.b, uint64(v)) }
func (w *writer) length(n int)     { w.b = appendVarint(w.b, uint64(n)) }
func (w *writer) bytes(v []byte)   { w.length(len(v)); w.b = append(w.b, v...) }
func (w *writer) str(v string)     { w.length(len(v)); w.b = append(w.b, v...) }
func (w *writer) uuid(v TxID)      { w.length(16); w.b = append(w.b, v[:]...) }
func (w *writer) variant(i uint32) { w.u32(i) }

// reader takes a body apart; every method fails rather than read past the
// end or accept what postcard would refuse.
type reader struct {
	b   []byte
	pos int
}

func (r *reader) rest() int { return len(r.b) - r.pos }

func (r *reader) u8() (uint8, error) {
	if r.pos >= len(r.b) {
		return 0, fmt.Errorf("unexpected end of message")
	}
	v := r.b[r.pos]
	r.pos++
	return v, nil
}

// varint reads a postcard varint of at most maxBytes bytes. Like postcard,
// it accepts a longer-than-needed encoding (0x81 0x00 is 1) and refuses one
// that does not end within maxBytes or whose last byte overflows the width.
func (r *reader) varint(maxBytes int, lastMax byte) (uint64, error) {
	var out uint64
	for i := 0; i < maxBytes; i++ {
		c, err := r.u8()
		if err != nil {
			return 0, err
		}
		out |= uint64(c&0x7f) << (7 * uint(i))
		if c&0x80 == 0 {
			if i == maxBytes-1 && c > lastMax {
				return 0, fmt.Errorf("varint overflows its width")
			}
			return out, nil
		}
	}
	return 0, fmt.Errorf("varint longer than %d bytes", maxBytes)
}

func (r *reader) u16() (uint16, error) {
	v, err := r.varint(maxBytesU16, lastMaxU16)
	return uint16(v), err
}

func (r *reader) u32() (uint32, error) {
	v, err := r.varint(maxBytesU32, lastMaxU32)
	return uint32(v), err
}

// length reads a varint length (postcard's usize: a u64 varint) and checks
// that that many bytes follow.
func (r *reader) length() (int, error) {
	v, err := r.varint(maxBytesU64, lastMaxU64)
	if err != nil {
		return 0, err
	}
	if v > uint64(r.rest()) {
		return 0, fmt.Errorf("length %d exceeds the %d bytes left", v, r.rest())
	}
	return int(v), nil
}

func (r *reader) bytes() ([]byte, error) {
	n, err := r.length()
	if err != nil {
		return nil, err
	}
	v := make([]byte, n)
	copy(v, r.b[r.pos:r.pos+n])
	r.pos += n
	return v, nil
}

func (r *reader) str() (string, error) {
	n, err := r.length()
	if err != nil {
		return "", err
	}
	s := r.b[r.pos : r.pos+n]
	if !utf8.Valid(s) {
		return "", fmt.Errorf("string is not valid UTF-8")
	}
	r.pos += n
	return string(s), nil
}

func (r *reader) uuid() (TxID, error) {
	var id TxID
	n, err := r.length()
	if err != nil {
		return id, err
	}
	if n != 16 {
		return id, fmt.Errorf("a UUID is 16 bytes, got %d", n)
	}
	copy(id[:], r.b[r.pos:r.pos+16])
	r.pos += 16
	return id, nil
}

// variant reads an enum's variant index and checks it is below count.
func (r *reader) variant(what string, count uint32) (uint32, error) {
	v, err := r.u32()
	if err != nil {
		return 0, err
	}
	if v >= count {
		return 0, fmt.Errorf("%s variant %d does not exist", what, v)
	}
	return v, nil
}

// name reads a participant or client name and checks the naming rule.
func (r *reader) name(what string) (string, error) {
	s, err := r.str()
	if err != nil {
		return "", err
	}
	if err := CheckName(s); err != nil {
		return "", fmt.Errorf("%s %s", what, err)
	}
	return s, nil
}
