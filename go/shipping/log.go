package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Logs go to stderr, one line per event: time, level, message, then
// key=value pairs. Values are quoted when they hold spaces, quotes, '=' or
// control characters, so that no value a client sent can forge a line.

var logMu sync.Mutex

func logf(level, msg string, kv ...interface{}) {
	var b strings.Builder
	b.WriteString(time.Now().UTC().Format("2006-01-02T15:04:05.000000Z"))
	b.WriteByte(' ')
	b.WriteString(level)
	b.WriteByte(' ')
	b.WriteString(clean(msg))
	for i := 0; i+1 < len(kv); i += 2 {
		b.WriteByte(' ')
		b.WriteString(fmt.Sprint(kv[i]))
		b.WriteByte('=')
		b.WriteString(value(fmt.Sprint(kv[i+1])))
	}
	b.WriteByte('\n')
	logMu.Lock()
	os.Stderr.WriteString(b.String())
	logMu.Unlock()
}

// clean escapes control characters in a message.
func clean(s string) string {
	for _, r := range s {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			q := strconv.Quote(s)
			return q[1 : len(q)-1]
		}
	}
	return s
}

func value(s string) string {
	if s == "" || strings.ContainsAny(s, " \"=\\") || clean(s) != s {
		return strconv.Quote(s)
	}
	return s
}

func info(msg string, kv ...interface{})   { logf("INFO", msg, kv...) }
func warn(msg string, kv ...interface{})   { logf("WARN", msg, kv...) }
func errorf(msg string, kv ...interface{}) { logf("ERROR", msg, kv...) }
