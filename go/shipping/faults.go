package main

// Fault injection for tests, armed from the environment in the format of
// the Rust services (common/src/fault.rs):
//
//   - TWOPC_CRASH_AT=name[:n][,name[:n]...]: the process exits with status
//     86 (os.Exit: no deferred calls, nothing flushed) the n-th time
//     (default first) it reaches crash point name.
//   - TWOPC_STOP_AT=name[:n][,...]: the process stops itself (SIGSTOP) the
//     n-th time it reaches crash point name; SIGCONT resumes it there.
//   - TWOPC_DELAY=name:ms[,...]: the process sleeps ms at delay point name,
//     every time.
//
// Point names are <participant>.<step>.<moment>: for the participant
// shipping, the crash points are
//
//	shipping.prepare.before_durable  prepare written, not committed
//	shipping.prepare.after_durable   prepare durable, vote not sent
//	shipping.decide.before_apply     decision received, nothing written
//	shipping.decide.before_durable   decision written, not committed
//	shipping.decide.after_durable    decision durable, reply not sent
//	shipping.recover.before_apply    recovery got the decision, not applied
//
// and the delay points shipping.prepare and shipping.decide (before handling
// one). The faults file (TWOPC_FAULTS_FILE) of the Rust services is not
// implemented.

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// CrashExitStatus is what a crash point exits with.
const CrashExitStatus = 86

type faultSet struct {
	mu    sync.Mutex
	crash map[string]uint64 // hits remaining before the crash
	stop  map[string]uint64
	delay map[string]time.Duration
}

var faults = loadFaults()

func parseFaultList(v string) map[string]uint64 {
	out := map[string]uint64{}
	for _, item := range strings.Split(v, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		n := uint64(1)
		if i := strings.LastIndexByte(item, ':'); i >= 0 {
			if k, err := strconv.ParseUint(item[i+1:], 10, 64); err == nil {
				item, n = item[:i], k
				if n == 0 {
					n = 1
				}
			}
		}
		out[item] = n
	}
	return out
}

func loadFaults() *faultSet {
	f := &faultSet{
		crash: parseFaultList(os.Getenv("TWOPC_CRASH_AT")),
		stop:  parseFaultList(os.Getenv("TWOPC_STOP_AT")),
		delay: map[string]time.Duration{},
	}
	for _, item := range strings.Split(os.Getenv("TWOPC_DELAY"), ",") {
		item = strings.TrimSpace(item)
		if i := strings.LastIndexByte(item, ':'); i > 0 {
			if ms, err := strconv.ParseUint(item[i+1:], 10, 64); err == nil {
				f.delay[item[:i]] = time.Duration(ms) * time.Millisecond
			}
		}
	}
	return f
}

// armed lists the armed points, for the start-up log line.
func (f *faultSet) armed() string {
	var out []string
	for k := range f.crash {
		out = append(out, "crash:"+k)
	}
	for k := range f.stop {
		out = append(out, "stop:"+k)
	}
	for k, d := range f.delay {
		out = append(out, fmt.Sprintf("delay:%s:%d", k, d.Milliseconds()))
	}
	return "[" + strings.Join(out, ",") + "]"
}

// crashPoint exits the process here if the point is armed and due, or
// stops it here if it is armed as a stop point and due.
func crashPoint(name string) {
	f := faults
	if len(f.crash) == 0 && len(f.stop) == 0 {
		return
	}
	f.mu.Lock()
	stopNow, crashNow := false, false
	if n, ok := f.stop[name]; ok && n > 0 {
		f.stop[name] = n - 1
		stopNow = n == 1
	}
	if n, ok := f.crash[name]; ok && n > 0 {
		f.crash[name] = n - 1
		crashNow = n == 1
	}
	f.mu.Unlock()
	if stopNow {
		fmt.Fprintf(os.Stderr, "STOP POINT %s: stopping the process (SIGSTOP); SIGCONT resumes it\n", name)
		_ = syscall.Kill(os.Getpid(), syscall.SIGSTOP)
		fmt.Fprintf(os.Stderr, "STOP POINT %s: continued\n", name)
	}
	if crashNow {
		// Straight to stderr, unbuffered: tests read this line.
		fmt.Fprintf(os.Stderr, "CRASH POINT %s: exiting the process (status %d)\n", name, CrashExitStatus)
		os.Exit(CrashExitStatus)
	}
}

// delayPoint sleeps if the delay point is armed.
func delayPoint(name string) {
	if d, ok := faults.delay[name]; ok {
		warn("injected delay", "point", name, "delay_ms", d.Milliseconds())
		time.Sleep(d)
	}
}
