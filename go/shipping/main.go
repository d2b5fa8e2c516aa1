// Command twopc-shipping is a twopc participant in Go: a shipping service
// that books capacity of delivery slots, as the participant "shipping" of
// twopc's two-phase commit over NATS. Written from PROTOCOL.md at the
// repository root; see go/README.md for what it keeps of the protocol.
//
// A branch's op: {"user": "al", "slot": "2025-06-02-am", "qty": 1}.
// Prepare holds qty of the slot's capacity, commit books it, abort releases
// it.
package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"

	"twopc/protocol"
)

func main() {
	cfg, err := ParseConfig(os.Args[1:])
	if err != nil {
		if errors.Is(err, flagHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(2)
	}
	stop := make(chan struct{})
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		close(stop)
	}()
	if err := Run(cfg, stop); err != nil {
		errorf("exiting", "participant", cfg.Name, "error", err)
		os.Exit(1)
	}
}

// connect makes the NATS connection: NKey identity from the seed file,
// replies under the identity's own inbox prefix, reconnecting forever.
func connect(cfg Config) (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name(cfg.Name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.RetryOnFailedConnect(true),
		nats.DrainTimeout(DrainTimeout),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				warn("disconnected from NATS", "error", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { info("reconnected to NATS", "url", nc.ConnectedUrl()) }),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			warn("NATS error", "subject", subject, "error", err)
		}),
	}
	if cfg.NkeyFile != "" {
		o, err := nats.NkeyOptionFromSeed(cfg.NkeyFile)
		if err != nil {
			return nil, fmt.Errorf("NKey seed %s: %w", cfg.NkeyFile, err)
		}
		opts = append(opts, o)
	}
	if cfg.InboxPrefix != "" {
		opts = append(opts, nats.CustomInboxPrefix(cfg.InboxPrefix))
	}
	return nats.Connect(cfg.NatsURL, opts...)
}

// waitConnected waits for the first connection (or stop).
func waitConnected(nc *nats.Conn, stop <-chan struct{}) error {
	said := false
	for {
		if nc.IsConnected() {
			if err := nc.FlushTimeout(2 * time.Second); err == nil {
				return nil
			}
		}
		if nc.IsClosed() {
			if err := nc.LastError(); err != nil {
				return fmt.Errorf("NATS connection closed: %w", err)
			}
			return errors.New("NATS connection closed")
		}
		if !said {
			info("waiting for NATS", "servers", nc.Opts.Servers)
			said = true
		}
		select {
		case <-stop:
			return errStopped
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Run serves until stop is closed (then drains) or a failure.
func Run(cfg Config, stop <-chan struct{}) error {
	lock, err := takeFolderLock(dirOf(cfg.DBPath))
	if err != nil {
		return err
	}
	defer lock.Close()
	store, err := OpenStore(cfg.DBPath)
	if err != nil {
		return err
	}
	defer store.Close()
	info("database open (WAL, synchronous=FULL; one writer, group commit; reads on their own connections)", "participant", cfg.Name, "db", cfg.DBPath)
	nc, err := connect(cfg)
	if err != nil {
		return err
	}
	defer nc.Close()
	if err := waitConnected(nc, stop); err != nil {
		if err == errStopped {
			info("stopped before connecting to NATS; exiting", "participant", cfg.Name)
			return nil
		}
		return err
	}
	own, err := acquire(nc, cfg, store, stop)
	if err == errStopped {
		info("stopped before owning the name; exiting", "participant", cfg.Name)
		return nil
	}
	if err != nil {
		return err
	}
	mark, err := store.StartMark()
	if err != nil {
		return err
	}
	p := &Participant{cfg: cfg, store: store, nc: nc, stopping: make(chan struct{})}
	srv := &server{nc: nc, max: cfg.MaxInflight}
	queue := protocol.QueueGroup(cfg.Name)
	busyVote := protocol.Encode(protocol.Vote{Code: protocol.Busy, Message: cfg.Name + " is at its in-flight limit"})
	busyDecide := protocol.Encode(protocol.DecideReply{Code: protocol.Busy, Message: cfg.Name + " is at its in-flight limit"})
	busyJSON := (&ApiError{protocol.Busy, "too many requests in flight"}).JSON()
	busy := func(body []byte) Response {
		return errorResponse(body, 503, "busy: "+cfg.Name+" is at its in-flight limit")
	}
	srv.add("prepare", protocol.PrepareSubject(cfg.Name), queue, busy(busyVote), p.onPrepare)
	srv.add("decide", protocol.DecideSubject(cfg.Name), queue, busy(busyDecide), p.onDecide)
	srv.add("tx-status", cfg.Name+".tx", queue, busy(busyJSON), p.onTxStatus)
	srv.add("in-doubt", cfg.Name+".in_doubt", queue, busy(busyJSON), p.onInDoubt)
	srv.add("create-slot", cfg.Name+".slots.create", queue, busy(busyJSON), p.onCreateSlot)
	srv.add("slot", cfg.Name+".slot", queue, busy(busyJSON), p.onSlot)
	if err := srv.start(); err != nil {
		return err
	}
	disc := &discovery{nc: nc, name: cfg.Name, description: "twopc shipping (Go): delivery slots, capacity held while a booking is prepared", srv: srv}
	if err := disc.start(); err != nil {
		return err
	}
	// The subscriptions are active once the server has seen them.
	if err := nc.FlushTimeout(5 * time.Second); err != nil {
		return fmt.Errorf("subscribing: %w", err)
	}
	var loops sync.WaitGroup
	loops.Add(2)
	go p.recoveryLoop(mark, &loops)
	go p.collectionLoop(&loops)
	info("participant serving", "participant", cfg.Name, "faults", faults.armed(),
		"window_ms", cfg.Window.WindowMs, "retention_ms", cfg.Window.RetentionMs, "max_skew_ms", cfg.Window.MaxSkewMs)

	var failure error
	select {
	case <-stop:
		info("SIGTERM: draining (no new requests; in-flight ones finish)", "participant", cfg.Name)
	case <-own.lostCh:
		failure = fmt.Errorf("%s: fenced, exiting: %v", cfg.Name, own.lost.Load())
	case <-closedCh(nc):
		failure = fmt.Errorf("the NATS connection closed: %v", nc.LastError())
	}
	close(p.stopping)
	srv.drain()
	loops.Wait()
	disc.stop()
	// Let go of the name only after the drain.
	own.release()
	_ = nc.FlushTimeout(2 * time.Second)
	if failure != nil {
		return failure
	}
	info("drained; exiting", "participant", cfg.Name)
	return nil
}

// closedCh is closed when the connection closes for good.
func closedCh(nc *nats.Conn) <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		for !nc.IsClosed() {
			time.Sleep(200 * time.Millisecond)
		}
		close(ch)
	}()
	return ch
}
