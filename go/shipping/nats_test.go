package main

// Against a real nats-server ($NATS_SERVER_BIN, else the project's
// .tools/nats-venv, else PATH), this test plays the coordinator: it sends
// postcard prepares and decisions, answers decision queries, and reads the
// public JSON subjects. The service runs in this process (Run), or as a
// child process (this test binary re-run as the service) where it must
// crash or be signalled.

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"twopc/protocol"
)

// TestMain re-runs this binary as the service when asked (crash tests).
func TestMain(m *testing.M) {
	if os.Getenv("TWOPC_SHIPPING_TEST_AS_MAIN") == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

func natsServerBin(t *testing.T) string {
	t.Helper()
	if b := os.Getenv("NATS_SERVER_BIN"); b != "" {
		return b
	}
	for _, b := range []string{"../../.tools/nats-venv/bin/nats-server"} {
		if _, err := os.Stat(b); err == nil {
			abs, _ := filepath.Abs(b)
			// Abs is lexical from the GOPATH path; the relative path is
			// what the kernel resolved, so use it when Abs is wrong.
			if _, err := os.Stat(abs); err == nil {
				return abs
			}
			return b
		}
	}
	if b, err := exec.LookPath("nats-server"); err == nil {
		return b
	}
	t.Fatal("no nats-server: set NATS_SERVER_BIN (scripts/install-nats.sh installs one)")
	return ""
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startNats starts a nats-server (no auth) on a free port; stopped at the
// end of the test.
func startNats(t *testing.T) string {
	t.Helper()
	port := freePort(t)
	cmd := exec.Command(natsServerBin(t), "-a", "127.0.0.1", "-p", fmt.Sprint(port))
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	})
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	for i := 0; i < 100; i++ {
		if nc, err := nats.Connect(url); err == nil {
			nc.Close()
			return url
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("nats-server did not start: %s", log.String())
	return ""
}

func testConfig(t *testing.T, url, dir string) Config {
	t.Helper()
	cfg, err := ParseConfig([]string{"-nats-url", url, "-data-dir", dir,
		"-in-doubt-after-ms", "300", "-recovery-interval-ms", "100", "-decision-timeout-ms", "500"})
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// runService runs the service in this process until the test ends, and
// waits until it serves.
func runService(t *testing.T, cfg Config, nc *nats.Conn) {
	t.Helper()
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- Run(cfg, stop) }()
	t.Cleanup(func() {
		close(stop)
		if err := <-done; err != nil {
			t.Errorf("service: %v", err)
		}
	})
	waitServing(t, nc, cfg.Name, done)
}

// waitServing pings the service's $SRV subject until it answers.
func waitServing(t *testing.T, nc *nats.Conn, name string, done chan error) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-done:
			t.Fatalf("service ended: %v", err)
		default:
		}
		if _, err := nc.Request("$SRV.PING."+name, nil, 200*time.Millisecond); err == nil {
			return
		}
	}
	t.Fatal("the service did not start serving")
}

// coordinator is the test's side of the protocol.
type coordinator struct {
	t  *testing.T
	nc *nats.Conn
}

func (c coordinator) request(subject string, body []byte) *nats.Msg {
	c.t.Helper()
	m, err := c.nc.Request(subject, body, 5*time.Second)
	if err != nil {
		c.t.Fatalf("%s: %v", subject, err)
	}
	return m
}

func (c coordinator) prepare(tx protocol.TxID, op string) protocol.Vote {
	c.t.Helper()
	m := c.request("twopc.shipping.prepare", protocol.Encode(protocol.Prepare{Tx: tx, Client: "web", Op: []byte(op)}))
	v, err := protocol.DecodeVote(m.Data)
	if err != nil {
		c.t.Fatalf("vote: %v (%x)", err, m.Data)
	}
	return v
}

func (c coordinator) decide(tx protocol.TxID, d protocol.Decision) protocol.DecideReply {
	c.t.Helper()
	m := c.request("twopc.shipping.decide", protocol.Encode(protocol.Decide{Tx: tx, Decision: d}))
	r, err := protocol.DecodeDecideReply(m.Data)
	if err != nil {
		c.t.Fatalf("decide reply: %v (%x)", err, m.Data)
	}
	return r
}

func (c coordinator) json(subject, body string) map[string]interface{} {
	c.t.Helper()
	m := c.request(subject, []byte(body))
	var out map[string]interface{}
	if err := json.Unmarshal(m.Data, &out); err != nil {
		c.t.Fatalf("%s: %v: %s", subject, err, m.Data)
	}
	return out
}

func (c coordinator) state(tx protocol.TxID) string {
	c.t.Helper()
	return c.json("shipping.tx", `{"tx":"`+tx.String()+`"}`)["state"].(string)
}

func (c coordinator) slot(name string) map[string]interface{} {
	c.t.Helper()
	return c.json("shipping.slot", `{"slot":"`+name+`"}`)
}

func connectTest(t *testing.T, url string) *nats.Conn {
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func TestAgainstNats(t *testing.T) {
	url := startNats(t)
	nc := connectTest(t, url)
	cfg := testConfig(t, url, t.TempDir())
	runService(t, cfg, nc)
	c := coordinator{t, nc}

	// The public subjects.
	if s := c.json("shipping.slots.create", `{"slot":"mon-am","capacity":2}`); s["available"] != 2.0 {
		t.Fatalf("create: %v", s)
	}
	m := c.request("shipping.slots.create", []byte(`{"slot":"mon-am","capacity":2}`))
	if !strings.Contains(string(m.Data), `"already_exists"`) || m.Header.Get("Nats-Service-Error-Code") != "409" {
		t.Fatalf("second create: %s %v", m.Data, m.Header)
	}
	for body, code := range map[string]string{
		`{"slot":"x"`:                "malformed_json",
		`{"slot":"x","capacity":-1}`: "invalid_request",
		`{"slot":"x"}`:               "invalid_request",
		`[1]`:                        "invalid_request",
	} {
		m := c.request("shipping.slots.create", []byte(body))
		var e struct {
			Error struct{ Code, Message string }
		}
		if err := json.Unmarshal(m.Data, &e); err != nil || e.Error.Code != code || m.Header.Get("Nats-Service-Error") == "" {
			t.Errorf("%s: %s (want %s)", body, m.Data, code)
		}
	}
	if e := c.json("shipping.slot", `{"slot":"nope"}`); e["error"].(map[string]interface{})["code"] != "unknown_sku" {
		t.Errorf("unknown slot: %v", e)
	}

	t.Run("prepare, replay, commit", func(t *testing.T) {
		c := coordinator{t, nc}
		tx := protocol.NewV7(nowMs())
		op := `{"qty":1,"slot":"mon-am","user":"al"}`
		if v := c.prepare(tx, op); !v.Yes {
			t.Fatalf("prepare: %v", v)
		}
		if s := c.slot("mon-am"); s["held"] != 1.0 || s["available"] != 1.0 {
			t.Fatalf("slot after prepare: %v", s)
		}
		if v := c.prepare(tx, op); !v.Yes {
			t.Fatalf("replayed prepare: %v", v)
		}
		if v := c.prepare(tx, `{"qty":2,"slot":"mon-am","user":"al"}`); v.Yes || v.Code != protocol.Conflict {
			t.Fatalf("prepare with another op: %v", v)
		}
		if st := c.state(tx); st != "prepared" {
			t.Fatalf("state %s", st)
		}
		if r := c.decide(tx, protocol.Commit); !r.Ack {
			t.Fatalf("commit: %v", r)
		}
		if r := c.decide(tx, protocol.Commit); !r.Ack {
			t.Fatalf("commit again: %v", r)
		}
		if r := c.decide(tx, protocol.Abort); r.Ack || r.Code != protocol.Conflict {
			t.Fatalf("abort after commit: %v", r)
		}
		if v := c.prepare(tx, op); !v.Yes {
			t.Fatalf("prepare after commit: %v", v)
		}
		if s := c.slot("mon-am"); s["held"] != 0.0 || s["booked"] != 1.0 {
			t.Fatalf("slot after commit: %v", s)
		}
		st := c.json("shipping.tx", `{"tx":"`+tx.String()+`"}`)
		if st["state"] != "committed" || st["participant"] != "shipping" || st["op"].(map[string]interface{})["slot"] != "mon-am" {
			t.Fatalf("tx status %v", st)
		}
	})

	t.Run("abort before prepare tombstones", func(t *testing.T) {
		c := coordinator{t, nc}
		tx := protocol.NewV7(nowMs())
		if r := c.decide(tx, protocol.Abort); !r.Ack {
			t.Fatalf("abort: %v", r)
		}
		if st := c.state(tx); st != "aborted" {
			t.Fatalf("state %s", st)
		}
		if v := c.prepare(tx, `{"qty":1,"slot":"mon-am","user":"al"}`); v.Yes || v.Code != protocol.AlreadyAborted {
			t.Fatalf("late prepare: %v", v)
		}
		if r := c.decide(tx, protocol.Commit); r.Ack || r.Code != protocol.Conflict {
			t.Fatalf("commit of a tombstone: %v", r)
		}
		if s := c.slot("mon-am"); s["held"] != 0.0 {
			t.Fatalf("held %v", s)
		}
	})

	t.Run("a full slot votes no and says why, again", func(t *testing.T) {
		c := coordinator{t, nc}
		tx := protocol.NewV7(nowMs())
		op := `{"qty":2,"slot":"mon-am","user":"bo"}`
		v := c.prepare(tx, op)
		if v.Yes || v.Code != protocol.OutOfStock {
			t.Fatalf("prepare: %v", v)
		}
		if again := c.prepare(tx, op); again != v {
			t.Fatalf("replay %v, first %v", again, v)
		}
		if r := c.decide(tx, protocol.Abort); !r.Ack {
			t.Fatalf("abort: %v", r)
		}
	})

	t.Run("refusals before anything is written", func(t *testing.T) {
		c := coordinator{t, nc}
		now := nowMs()
		v4, _ := protocol.ParseTxID("01930000-0000-4000-8000-00000000002a")
		for name, want := range map[protocol.TxID]protocol.Code{
			v4:                              protocol.BadTxID,
			protocol.NewV7(now + 3_600_000): protocol.TxInFuture,
			protocol.NewV7(now - 10*60_000): protocol.Expired,
		} {
			v := c.prepare(name, `{"qty":1,"slot":"mon-am","user":"al"}`)
			if v.Yes || v.Code != want {
				t.Errorf("%s: %v, want %s", name, v, want)
			}
			if st := c.state(name); st != "unknown" {
				t.Errorf("%s: stored as %s", name, st)
			}
		}
		// An op that is not a booking.
		if v := c.prepare(protocol.NewV7(now), `{"amount":300,"user":"al"}`); v.Yes || v.Code != protocol.BadMessage {
			t.Errorf("a debit sent to shipping: %v", v)
		}
		// Bytes that are no Prepare: bad_message; an old layout, or
		// another kind: Unsupported, listing what is spoken.
		m := c.request("twopc.shipping.prepare", []byte{2, 1, 16, 1})
		if v, err := protocol.DecodeVote(m.Data); err != nil || v.Code != protocol.BadMessage || m.Header.Get("Nats-Service-Error-Code") != "400" {
			t.Errorf("garbage: %v %v", v, err)
		}
		layout1, _ := hex.DecodeString("0101100193000000007000800000000000002a0002616cac02")
		for subject, body := range map[string][]byte{
			"twopc.shipping.prepare": layout1,
			"twopc.shipping.decide":  protocol.Encode(protocol.Vote{Yes: true}),
		} {
			m := c.request(subject, body)
			u, err := protocol.DecodeUnsupported(m.Data)
			if err != nil || len(u.Speaks) != 7 || u.Speaks[0] != (protocol.Speaks{Kind: 1, Version: 2}) {
				t.Errorf("%s: %v %+v", subject, err, u)
			}
		}
	})

	t.Run("services discovery", func(t *testing.T) {
		m, err := nc.Request("$SRV.INFO.shipping", nil, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		var info struct {
			Type      string
			Name      string
			Endpoints []struct {
				Subject    string
				QueueGroup string `json:"queue_group"`
			}
		}
		if err := json.Unmarshal(m.Data, &info); err != nil || info.Name != "shipping" || len(info.Endpoints) != 6 || info.Endpoints[0].QueueGroup != "twopc-shipping" {
			t.Fatalf("%s %v", m.Data, err)
		}
	})
}

// A prepared branch nobody decides is asked about on twopc.decision.shipping
// until an answer is applied; a refused query is asked again.
func TestRecoveryAsksTheCoordinator(t *testing.T) {
	url := startNats(t)
	nc := connectTest(t, url)
	cfg := testConfig(t, url, t.TempDir())
	c := coordinator{t, nc}
	tx := protocol.NewV7(nowMs())
	var mu sync.Mutex
	asked := 0
	answered := make(chan struct{}, 1)
	_, err := nc.QueueSubscribe("twopc.decision.*", "twopc-coordinator", func(m *nats.Msg) {
		q, err := protocol.DecodeDecisionQuery(m.Data)
		if err != nil || m.Subject != "twopc.decision."+q.Participant {
			t.Errorf("query %v on %s", err, m.Subject)
			return
		}
		mu.Lock()
		asked++
		n := asked
		mu.Unlock()
		if q.Tx != tx {
			m.Respond(protocol.Encode(protocol.DecisionReply{Code: protocol.Busy, Message: "not this one"}))
			return
		}
		if n == 1 {
			// First: ask again later.
			m.Respond(protocol.Encode(protocol.DecisionReply{Code: protocol.Busy, Message: "ask again"}))
			return
		}
		m.Respond(protocol.Encode(protocol.DecisionReply{Decided: true, Tx: tx, Decision: protocol.Commit}))
		select {
		case answered <- struct{}{}:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	runService(t, cfg, nc)
	c.json("shipping.slots.create", `{"slot":"tue-pm","capacity":5}`)
	started := time.Now()
	if v := c.prepare(tx, `{"qty":3,"slot":"tue-pm","user":"al"}`); !v.Yes {
		t.Fatalf("prepare: %v", v)
	}
	select {
	case <-answered:
	case <-time.After(10 * time.Second):
		t.Fatal("never asked twice")
	}
	if since := time.Since(started); since < 300*time.Millisecond {
		t.Errorf("asked %v after the prepare, before the in-doubt threshold", since)
	}
	deadline := time.Now().Add(5 * time.Second)
	for c.state(tx) != "committed" {
		if time.Now().After(deadline) {
			t.Fatalf("state %s", c.state(tx))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if s := c.slot("tue-pm"); s["booked"] != 3.0 || s["held"] != 0.0 {
		t.Fatalf("slot %v", s)
	}
	// Resolved: no more queries about it.
	mu.Lock()
	n := asked
	mu.Unlock()
	time.Sleep(500 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	if asked != n {
		t.Errorf("asked %d more times after resolving", asked-n)
	}
}

// child is the service as a process of its own (this test binary re-run).
type child struct {
	cmd *exec.Cmd
	log *syncBuffer
	err chan error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	os.Stderr.Write(p)
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startChild(t *testing.T, url, dir string, env ...string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-nats-url", url, "-data-dir", dir,
		"-in-doubt-after-ms", "300", "-recovery-interval-ms", "100", "-decision-timeout-ms", "500")
	cmd.Env = append(append(os.Environ(), "TWOPC_SHIPPING_TEST_AS_MAIN=1"), env...)
	c := &child{cmd: cmd, log: &syncBuffer{}, err: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = c.log, c.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { c.err <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
	})
	return c
}

func (c *child) waitLog(t *testing.T, s string) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(c.log.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the log:\n%s", s, c.log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (c *child) exitCode(t *testing.T) int {
	t.Helper()
	select {
	case err := <-c.err:
		if err == nil {
			return 0
		}
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		t.Fatal(err)
	case <-time.After(15 * time.Second):
		t.Fatal("the process did not exit")
	}
	return -1
}

// Durability: a crash after the prepare is durable, before the vote, leaves
// a prepared branch that the restarted process asks about at once; a crash
// before the commit of the prepare leaves nothing.
func TestCrashPointsAndRecoveryOnStart(t *testing.T) {
	url := startNats(t)
	nc := connectTest(t, url)
	c := coordinator{t, nc}
	dir := t.TempDir()
	queries := make(chan protocol.DecisionQuery, 64)
	var mu sync.Mutex
	decided := map[protocol.TxID]protocol.Decision{}
	_, err := nc.Subscribe("twopc.decision.shipping", func(m *nats.Msg) {
		q, err := protocol.DecodeDecisionQuery(m.Data)
		if err != nil {
			t.Errorf("query: %v", err)
			return
		}
		mu.Lock()
		d, ok := decided[q.Tx]
		mu.Unlock()
		if !ok {
			m.Respond(protocol.Encode(protocol.DecisionReply{Code: protocol.Busy, Message: "ask again"}))
			return
		}
		select {
		case queries <- q:
		default:
		}
		m.Respond(protocol.Encode(protocol.DecisionReply{Decided: true, Tx: q.Tx, Decision: d}))
	})
	if err != nil {
		t.Fatal(err)
	}
	nc.Flush()

	p := startChild(t, url, dir, "TWOPC_CRASH_AT=shipping.prepare.after_durable")
	p.waitLog(t, "participant serving")
	c.json("shipping.slots.create", `{"slot":"wed","capacity":4}`)
	tx := protocol.NewV7(nowMs())
	mu.Lock()
	decided[tx] = protocol.Abort
	mu.Unlock()
	op := protocol.Encode(protocol.Prepare{Tx: tx, Client: "web", Op: []byte(`{"qty":4,"slot":"wed","user":"al"}`)})
	if m, err := nc.Request("twopc.shipping.prepare", op, time.Second); err == nil {
		t.Fatalf("a vote left the crashed process: %x", m.Data)
	}
	if code := p.exitCode(t); code != CrashExitStatus {
		t.Fatalf("exit %d, want %d", code, CrashExitStatus)
	}
	if !strings.Contains(p.log.String(), "CRASH POINT shipping.prepare.after_durable") {
		t.Fatal("no crash line")
	}

	// Restarted: the branch was prepared before this process, so it is in
	// doubt at once; the coordinator says abort, and the hold goes.
	p2 := startChild(t, url, dir, "TWOPC_CRASH_AT=shipping.prepare.before_durable")
	select {
	case q := <-queries:
		if q.Tx != tx || q.Participant != "shipping" {
			t.Fatalf("query %+v", q)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the restarted process did not ask:\n%s", p2.log.String())
	}
	p2.waitLog(t, "participant serving")
	deadline := time.Now().Add(5 * time.Second)
	for c.state(tx) != "aborted" {
		if time.Now().After(deadline) {
			t.Fatalf("state %s", c.state(tx))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if s := c.slot("wed"); s["held"] != 0.0 || s["available"] != 4.0 {
		t.Fatalf("slot %v", s)
	}
	// The replayed prepare gets the stored answer: the abort.
	if v := c.prepare(tx, `{"qty":4,"slot":"wed","user":"al"}`); v.Yes {
		t.Fatalf("prepare after abort: %v", v)
	}

	// A crash before the prepare's COMMIT: nothing was stored.
	tx2 := protocol.NewV7(nowMs())
	op2 := protocol.Encode(protocol.Prepare{Tx: tx2, Client: "web", Op: []byte(`{"qty":1,"slot":"wed","user":"al"}`)})
	if _, err := nc.Request("twopc.shipping.prepare", op2, time.Second); err == nil {
		t.Fatal("a vote left the crashed process")
	}
	if code := p2.exitCode(t); code != CrashExitStatus {
		t.Fatalf("exit %d", code)
	}
	p3 := startChild(t, url, dir, "TWOPC_CRASH_AT=shipping.decide.after_durable")
	p3.waitLog(t, "participant serving")
	if st := c.state(tx2); st != "unknown" {
		t.Fatalf("a prepare that crashed before its commit is %s", st)
	}
	if s := c.slot("wed"); s["held"] != 0.0 {
		t.Fatalf("slot %v", s)
	}
	// A decision applied durably, then a crash before the acknowledgement:
	// applied; the redelivery is acknowledged without applying twice.
	tx3 := protocol.NewV7(nowMs())
	if v := c.prepare(tx3, `{"qty":2,"slot":"wed","user":"al"}`); !v.Yes {
		t.Fatalf("prepare: %v", v)
	}
	if _, err := nc.Request("twopc.shipping.decide", protocol.Encode(protocol.Decide{Tx: tx3, Decision: protocol.Commit}), time.Second); err == nil {
		t.Fatal("an ack left the crashed process")
	}
	if code := p3.exitCode(t); code != CrashExitStatus {
		t.Fatalf("exit %d", code)
	}
	p4 := startChild(t, url, dir)
	p4.waitLog(t, "participant serving")
	if r := c.decide(tx3, protocol.Commit); !r.Ack {
		t.Fatalf("redelivered commit: %v", r)
	}
	if s := c.slot("wed"); s["booked"] != 2.0 || s["held"] != 0.0 {
		t.Fatalf("slot %v", s)
	}

	// SIGTERM drains and exits 0; a second instance on another folder
	// (another store) refuses to serve beside a live one.
	other := startChild(t, url, t.TempDir())
	other.waitLog(t, "not serving")
	if code := other.exitCode(t); code == 0 {
		t.Fatal("a second store served the name")
	}
	if strings.Contains(other.log.String(), "OWNER:") {
		t.Fatal("the second instance claimed to own the name")
	}
	_ = p4.cmd.Process.Signal(syscall.SIGTERM)
	if code := p4.exitCode(t); code != 0 {
		t.Fatalf("SIGTERM: exit %d\n%s", code, p4.log.String())
	}
	p4.waitLog(t, "drained; exiting")
}

// With the launcher's credentials and permissions for a participant
// (launcher/src/auth.rs, Role::Participant): an NKey seed file with a
// comment line, replies under _INBOX_shipping, the public subjects in the
// queue group, decision queries and owner asks.
func TestWithTheLaunchersPermissions(t *testing.T) {
	dir := t.TempDir()
	shipping, _ := nkeys.CreateUser()
	coord, _ := nkeys.CreateUser()
	seed := func(kp nkeys.KeyPair, name string) (string, string) {
		s, _ := kp.Seed()
		pub, _ := kp.PublicKey()
		path := filepath.Join(dir, name+".nk")
		text := fmt.Sprintf("# NKey seed of twopc identity %q: keep it secret.\n%s\n", name, s)
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return path, pub
	}
	shippingSeed, shippingPub := seed(shipping, "shipping")
	coordSeed, coordPub := seed(coord, "coordinator")
	list := func(s ...string) string {
		q := make([]string, len(s))
		for i, x := range s {
			q[i] = fmt.Sprintf("%q", x)
		}
		return "[" + strings.Join(q, ", ") + "]"
	}
	port := freePort(t)
	conf := fmt.Sprintf(`listen: "127.0.0.1:%d"
authorization {
  users = [
    { nkey: %q, permissions: {
        publish: { allow: %s }
        subscribe: { allow: %s }
        allow_responses: true
    } },
    { nkey: %q }
  ]
}
`, port, shippingPub,
		list("twopc.decision.shipping", "twopc.shipping.owner", "$JS.API.INFO",
			"$JS.API.STREAM.INFO.KV_twopc_owners", "$JS.API.STREAM.MSG.GET.KV_twopc_owners", "$KV.twopc_owners.shipping"),
		list("twopc.shipping.prepare twopc-shipping", "twopc.shipping.decide twopc-shipping", "shipping.> twopc-shipping",
			"$SRV.*", "$SRV.*.shipping", "$SRV.*.shipping.*", "twopc.shipping.owner", "_INBOX_shipping.>"),
		coordPub)
	confPath := filepath.Join(dir, "nats.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(natsServerBin(t), "-c", confPath)
	var serverLog syncBuffer
	cmd.Stdout, cmd.Stderr = &serverLog, &serverLog
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Signal(syscall.SIGTERM); _ = cmd.Wait() })
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	coordOpt, err := nats.NkeyOptionFromSeed(coordSeed)
	if err != nil {
		t.Fatal(err)
	}
	var nc *nats.Conn
	for i := 0; i < 100; i++ {
		if nc, err = nats.Connect(url, coordOpt); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	tx := protocol.NewV7(nowMs())
	queried := make(chan struct{}, 1)
	if _, err := nc.QueueSubscribe("twopc.decision.*", "twopc-coordinator", func(m *nats.Msg) {
		q, err := protocol.DecodeDecisionQuery(m.Data)
		if err != nil || q.Tx != tx {
			m.Respond(protocol.Encode(protocol.DecisionReply{Code: protocol.Busy, Message: "later"}))
			return
		}
		m.Respond(protocol.Encode(protocol.DecisionReply{Decided: true, Tx: tx, Decision: protocol.Commit}))
		select {
		case queried <- struct{}{}:
		default:
		}
	}); err != nil {
		t.Fatal(err)
	}
	nc.Flush()

	cfg := testConfig(t, url, filepath.Join(dir, "data"))
	cfg.NkeyFile = shippingSeed
	cfg.InboxPrefix = "_INBOX_shipping"
	if got, _ := ParseConfig([]string{"-nkey", shippingSeed}); got.InboxPrefix != "_INBOX_shipping" {
		t.Fatalf("inbox prefix from the seed file's name: %q", got.InboxPrefix)
	}
	runService(t, cfg, nc)
	c := coordinator{t, nc}
	c.json("shipping.slots.create", `{"slot":"thu","capacity":1}`)
	if v := c.prepare(tx, `{"qty":1,"slot":"thu","user":"al"}`); !v.Yes {
		t.Fatalf("prepare: %v", v)
	}
	select {
	case <-queried:
	case <-time.After(10 * time.Second):
		t.Fatal("no decision query reached the coordinator")
	}
	deadline := time.Now().Add(5 * time.Second)
	for c.state(tx) != "committed" {
		if time.Now().After(deadline) {
			t.Fatalf("state %s", c.state(tx))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if log := serverLog.String(); strings.Contains(log, "Permissions Violation") {
		t.Fatalf("the server refused something:\n%s", log)
	}
}

// Two instances of two stores started at once: exactly one serves, the
// other refuses (they do not back off from each other for ever).
func TestTwoInstancesStartedAtOnce(t *testing.T) {
	url := startNats(t)
	a := startChild(t, url, t.TempDir())
	b := startChild(t, url, t.TempDir())
	deadline := time.Now().Add(20 * time.Second)
	var owner, other *child
	for owner == nil {
		if time.Now().After(deadline) {
			t.Fatalf("nobody serves:\n%s\n%s", a.log.String(), b.log.String())
		}
		switch {
		case strings.Contains(a.log.String(), "OWNER:"):
			owner, other = a, b
		case strings.Contains(b.log.String(), "OWNER:"):
			owner, other = b, a
		}
		time.Sleep(20 * time.Millisecond)
	}
	other.waitLog(t, "not serving")
	if code := other.exitCode(t); code == 0 {
		t.Fatal("the second store exited 0")
	}
	if strings.Contains(other.log.String(), "OWNER:") {
		t.Fatal("both served")
	}
	_ = owner.cmd.Process.Signal(syscall.SIGTERM)
	if code := owner.exitCode(t); code != 0 {
		t.Fatalf("owner exit %d", code)
	}
}

// Two standbys of the owner's store (copies of its folder) waiting while it
// serves: when it stops, exactly one takes over (two candidates that keep
// hearing each other must not back off for ever).
func TestTwoStandbysOneTakesOver(t *testing.T) {
	url := startNats(t)
	nc := connectTest(t, url)
	dir := t.TempDir()
	first := startChild(t, url, dir)
	first.waitLog(t, "participant serving")
	coordinator{t, nc}.json("shipping.slots.create", `{"slot":"fri","capacity":1}`)
	_ = first.cmd.Process.Signal(syscall.SIGTERM)
	if code := first.exitCode(t); code != 0 {
		t.Fatalf("exit %d", code)
	}
	var copies []string
	for i := 0; i < 2; i++ {
		c := t.TempDir()
		for _, f := range []string{"shipping.db", "shipping.db-wal", "shipping.db-shm"} {
			if b, err := os.ReadFile(filepath.Join(dir, f)); err == nil {
				if err := os.WriteFile(filepath.Join(c, f), b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
		copies = append(copies, c)
	}
	owner := startChild(t, url, dir)
	owner.waitLog(t, "OWNER:")
	a := startChild(t, url, copies[0])
	b := startChild(t, url, copies[1])
	a.waitLog(t, "STANDBY")
	b.waitLog(t, "STANDBY")
	_ = owner.cmd.Process.Signal(syscall.SIGTERM)
	if code := owner.exitCode(t); code != 0 {
		t.Fatalf("exit %d", code)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		ao, bo := strings.Contains(a.log.String(), "OWNER:"), strings.Contains(b.log.String(), "OWNER:")
		if ao && bo {
			t.Fatal("both standbys took over")
		}
		if ao || bo {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no standby took over")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The other stays a standby.
	time.Sleep(4 * time.Second)
	if strings.Contains(a.log.String(), "OWNER:") == strings.Contains(b.log.String(), "OWNER:") {
		t.Fatal("not exactly one owner")
	}
	if s := (coordinator{t, nc}).slot("fri"); s["capacity"] != 1.0 {
		t.Fatalf("slot %v", s)
	}
}
