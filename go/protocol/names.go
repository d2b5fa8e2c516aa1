package protocol

import (
	"errors"
	"fmt"
)

// MaxNameBytes is the longest participant or client name.
const MaxNameBytes = 32

// CheckName checks a participant or client name: 1 to 32 bytes of
// [a-z0-9_-], starting with a lowercase letter, and not "decision"
// (twopc.decision.* are the coordinator's decision queries). A name is one
// NATS subject token.
func CheckName(s string) error {
	if len(s) == 0 || len(s) > MaxNameBytes {
		return fmt.Errorf("%q: must be 1 to %d bytes long", s, MaxNameBytes)
	}
	if s[0] < 'a' || s[0] > 'z' {
		return fmt.Errorf("%q: must start with a lowercase letter", s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return fmt.Errorf("%q: may contain only a-z, 0-9, _ and -", s)
		}
	}
	if s == "decision" {
		return errors.New(`"decision" is reserved: twopc.decision.* are the coordinator's decision queries`)
	}
	return nil
}

// Subjects of participant p.
func PrepareSubject(p string) string       { return "twopc." + p + ".prepare" }
func DecideSubject(p string) string        { return "twopc." + p + ".decide" }
func DecisionQuerySubject(p string) string { return "twopc.decision." + p }
func OwnerSubject(p string) string         { return "twopc." + p + ".owner" }
func QueueGroup(p string) string           { return "twopc-" + p }
