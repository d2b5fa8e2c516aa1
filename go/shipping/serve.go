package main

// Serving subjects: each endpoint is a queue subscription whose callback
// only hands the message to a goroutine, at most MaxInflight at once per
// endpoint (past that the request is answered busy at once); replies carry
// the NATS services error headers for refusals, as the Rust services send
// them (common/src/serve.rs). Shutdown drains: no new messages, those
// already delivered are still answered.

import (
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// DrainTimeout bounds the wait for handlers in flight at shutdown.
const DrainTimeout = 10 * time.Second

// Response is a handler's answer: the body, and for an error reply the
// services-protocol status and description.
type Response struct {
	Body        []byte
	Status      int // 0: not an error
	Description string
}

func ok(body []byte) Response { return Response{Body: body} }

func errorResponse(body []byte, status int, description string) Response {
	return Response{Body: body, Status: status, Description: description}
}

// endpoint is one served subject with its statistics.
type endpoint struct {
	name    string
	subject string
	queue   string
	handler func(*nats.Msg) Response
	busy    Response
	slots   chan struct{}
	sub     *nats.Subscription

	mu         sync.Mutex
	requests   uint64
	errors     uint64
	processing time.Duration
	lastError  string
}

func (e *endpoint) record(took time.Duration, r Response) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.requests++
	e.processing += took
	if r.Status != 0 {
		e.errors++
		e.lastError = strconv.Itoa(r.Status) + ":" + r.Description
	}
}

// server holds a service's endpoints.
type server struct {
	nc        *nats.Conn
	endpoints []*endpoint
	inflight  sync.WaitGroup
	max       int
}

func (s *server) add(name, subject, queue string, busy Response, handler func(*nats.Msg) Response) {
	s.endpoints = append(s.endpoints, &endpoint{
		name: name, subject: subject, queue: queue, handler: handler, busy: busy,
		slots: make(chan struct{}, s.max),
	})
}

// reply sends r to the request's reply subject, with the error headers
// when r is a refusal.
func reply(nc *nats.Conn, m *nats.Msg, r Response) {
	if m.Reply == "" {
		return
	}
	out := &nats.Msg{Subject: m.Reply, Data: r.Body}
	if r.Status != 0 {
		out.Header = nats.Header{}
		out.Header.Set("Nats-Service-Error", r.Description)
		out.Header.Set("Nats-Service-Error-Code", strconv.Itoa(r.Status))
	}
	if err := nc.PublishMsg(out); err != nil {
		warn("reply not sent", "subject", m.Subject, "error", err)
	}
}

// start subscribes every endpoint.
func (s *server) start() error {
	for _, e := range s.endpoints {
		e := e
		sub, err := s.nc.QueueSubscribe(e.subject, e.queue, func(m *nats.Msg) {
			select {
			case e.slots <- struct{}{}:
			default:
				e.record(0, e.busy)
				reply(s.nc, m, e.busy)
				return
			}
			s.inflight.Add(1)
			go func() {
				defer func() { <-e.slots; s.inflight.Done() }()
				started := time.Now()
				r := e.handler(m)
				e.record(time.Since(started), r)
				reply(s.nc, m, r)
			}()
		})
		if err != nil {
			return err
		}
		// Bounded by memory rather than dropped quietly: a slow
		// consumer is logged by the connection's error handler.
		_ = sub.SetPendingLimits(65_536, 64*1024*1024)
		e.sub = sub
	}
	return nil
}

// drain stops taking requests and waits (bounded) for those in flight.
func (s *server) drain() {
	for _, e := range s.endpoints {
		if e.sub != nil {
			_ = e.sub.Drain()
		}
	}
	deadline := time.Now().Add(DrainTimeout)
	for _, e := range s.endpoints {
		for e.sub != nil && e.sub.IsValid() && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
	}
	done := make(chan struct{})
	go func() { s.inflight.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Until(deadline)):
		warn("handlers still running after the drain timeout")
	}
}
