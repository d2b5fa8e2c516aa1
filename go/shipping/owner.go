package main

// One owner per participant name, as far as this implementation goes
// (README.md): it does NOT hold the JetStream owner lease of the Rust
// participants (participants/src/ownership.rs). It keeps:
//
//   - the data folder's lock file (<folder>/owner.lock, flock): a second
//     process on the same folder refuses to start;
//   - the database's owner epoch, raised by one at every start and checked
//     inside every write batch before its COMMIT (a batch of an instance
//     whose epoch is no longer the database's is rolled back: not_owner);
//   - the Rust participants' "ask" protocol on twopc.<name>.owner (what
//     they use on a server without JetStream): before serving, an instance
//     asks who claims the name, raises its own claim, asks again, and
//     serves only if nobody else claims it; an owner asks again every 3 s
//     and the later of two serving instances stops. This detects a second
//     instance on another folder (another store: it refuses to serve); it
//     cannot fence a paused owner. So deploy ONE instance.

import (
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"

	"twopc/protocol"
)

const (
	askWindow  = 500 * time.Millisecond
	checkEvery = 3 * time.Second
	lockFile   = "owner.lock"
)

// OwnerPing is what an instance says of itself on twopc.<name>.owner, as
// the question and as each answer (schemas/src/ownership.rs, JSON).
type OwnerPing struct {
	Instance string `json:"instance"`
	Store    string `json:"store"`
	Serving  bool   `json:"serving"`
	Host     string `json:"host"`
	Pid      uint32 `json:"pid"`
	DataDir  string `json:"data_dir"`
}

func (o OwnerPing) String() string {
	return fmt.Sprintf("instance %s (pid %d on %s, data %s)", o.Instance, o.Pid, o.Host, o.DataDir)
}

// NewV7String is a fresh UUIDv7 as text.
func NewV7String() string { return protocol.NewV7(nowMs()).String() }

// takeFolderLock takes <dir>/owner.lock for the life of the process.
func takeFolderLock(dir string) (*os.File, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("another process holds %s: one instance per data folder", filepath.Join(dir, lockFile))
	}
	return f, nil
}

// owner is this instance's claim on its name.
type owner struct {
	nc      *nats.Conn
	name    string
	me      OwnerPing
	claim   atomic.Bool
	sub     *nats.Subscription
	epoch   int64
	lost    atomic.Value // string: why, once lost
	lostCh  chan struct{}
	lostMu  sync.Once
	stopped chan struct{}
}

func hostname() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "unknown"
	}
	return h
}

func (o *owner) now(serving bool) OwnerPing {
	p := o.me
	p.Serving = serving
	return p
}

// answer subscribes the owner subject and answers every ask there.
func (o *owner) answer() error {
	sub, err := o.nc.Subscribe(protocol.OwnerSubject(o.name), func(m *nats.Msg) {
		if m.Reply == "" {
			return
		}
		b, _ := json.Marshal(o.now(o.claim.Load()))
		_ = o.nc.Publish(m.Reply, b)
	})
	if err != nil {
		return err
	}
	o.sub = sub
	return o.nc.Flush()
}

// ask publishes what this instance is and collects answers for askWindow.
func (o *owner) ask(serving bool) ([]OwnerPing, error) {
	inbox := o.nc.NewInbox()
	sub, err := o.nc.SubscribeSync(inbox)
	if err != nil {
		return nil, err
	}
	defer sub.Unsubscribe()
	b, _ := json.Marshal(o.now(serving))
	if err := o.nc.PublishRequest(protocol.OwnerSubject(o.name), inbox, b); err != nil {
		return nil, err
	}
	if err := o.nc.Flush(); err != nil {
		return nil, err
	}
	var seen []OwnerPing
	deadline := time.Now().Add(askWindow)
	for {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			break // timeout: the window is over
		}
		if len(m.Data) == 0 && m.Header.Get("Status") == "503" {
			break // no responders
		}
		var a OwnerPing
		if err := json.Unmarshal(m.Data, &a); err != nil {
			warn("ignoring an owner answer that does not parse", "error", err)
			continue
		}
		if a.Instance != o.me.Instance {
			seen = append(seen, a)
		}
	}
	return seen, nil
}

// hear is what answers mean: another store's claim first (never serve
// beside it), then the earliest-started claim of this store (wait), else
// clear.
func (o *owner) hear(answers []OwnerPing) (string, *OwnerPing) {
	var claims []OwnerPing
	for _, a := range answers {
		if a.Serving && a.Instance != o.me.Instance {
			claims = append(claims, a)
		}
	}
	sort.Slice(claims, func(i, j int) bool { return claims[i].Instance < claims[j].Instance })
	for _, c := range claims {
		if c.Store != o.me.Store {
			c := c
			return "other_store", &c
		}
	}
	if len(claims) > 0 {
		return "wait", &claims[0]
	}
	return "clear", nil
}

// acquire waits until this instance may serve the name; an error means it
// must never serve under it (another store serves it).
func acquire(nc *nats.Conn, cfg Config, store *Store, stop <-chan struct{}) (*owner, error) {
	storeID, dbEpoch, err := store.StoreID()
	if err != nil {
		return nil, err
	}
	dir, _ := filepath.Abs(filepath.Dir(cfg.DBPath))
	o := &owner{nc: nc, name: cfg.Name, lostCh: make(chan struct{}), stopped: make(chan struct{}),
		me: OwnerPing{Instance: NewV7String(), Store: storeID, Host: hostname(), Pid: uint32(os.Getpid()), DataDir: dir}}
	if !cfg.SingleInstance {
		if err := o.answer(); err != nil {
			return nil, err
		}
		said := ""
		for {
			select {
			case <-stop:
				o.release()
				return nil, errStopped
			default:
			}
			others, err := o.ask(false)
			if err != nil {
				return nil, err
			}
			verdict, who := o.hear(others)
			if verdict == "other_store" {
				o.release()
				return nil, fmt.Errorf("%s: not serving: %s serves it with store %s; this data folder %s holds store %s. Two stores under one name would split its data", cfg.Name, who, who.Store, dir, storeID)
			}
			if verdict == "wait" {
				if said != who.Instance {
					info("STANDBY: "+cfg.Name+" is served by "+who.String()+"; serving nothing until it stops", "participant", cfg.Name)
					said = who.Instance
				}
				time.Sleep(askWindow)
				continue
			}
			if o.yieldsToCandidates(others) {
				time.Sleep(backOff())
				continue
			}
			// Nobody claims it (and no earlier candidate is about to):
			// claim, then serve only if an ask made after the claim hears
			// no other claim.
			o.claim.Store(true)
			again, err := o.ask(true)
			if err != nil {
				o.claim.Store(false)
				return nil, err
			}
			if v, _ := o.hear(again); v != "clear" {
				o.claim.Store(false)
				time.Sleep(backOff())
				continue
			}
			break
		}
	}
	// Take the database: a newer epoch, written before serving; every
	// write batch checks it is still this instance's.
	o.epoch = dbEpoch + 1
	r, err := store.w.Exec("UPDATE owner SET epoch = ? WHERE id = 1 AND epoch < ?", o.epoch, o.epoch)
	if err != nil {
		return nil, err
	}
	if n, _ := r.RowsAffected(); n != 1 {
		return nil, fmt.Errorf("%s: the database holds an epoch newer than %d: another instance took it; not serving", cfg.Name, o.epoch)
	}
	store.guard = o.check
	how := "by asking on " + protocol.OwnerSubject(cfg.Name) + "; no lease: run one instance"
	if cfg.SingleInstance {
		how = "single instance, not asking (TWOPC_SINGLE_INSTANCE)"
	}
	info("OWNER: this instance serves "+cfg.Name+" ("+how+")", "participant", cfg.Name, "epoch", o.epoch, "store", storeID)
	if !cfg.SingleInstance {
		go o.checker()
	}
	return o, nil
}

var errStopped = errors.New("stopped before owning the name")

// yieldsToCandidates says whether to back off when only candidates (no
// claims) answered: yes if one of them started earlier (a smaller UUIDv7
// instance id). The earliest candidate goes on to claim, so candidates that
// keep hearing each other cannot back off for ever. (Safety does not rest
// on this: a claim is cleared only by an ask that hears no other claim.)
func (o *owner) yieldsToCandidates(others []OwnerPing) bool {
	for _, a := range others {
		if a.Instance < o.me.Instance {
			return true
		}
	}
	return false
}

func backOff() time.Duration { return time.Duration(100+rand.Intn(500)) * time.Millisecond }

// checker asks again every few seconds; of two serving instances, the one
// that started later (larger UUIDv7 instance id) gives way.
func (o *owner) checker() {
	for {
		select {
		case <-time.After(checkEvery):
		case <-o.stopped:
			return
		}
		others, err := o.ask(true)
		if err != nil {
			continue
		}
		for _, a := range others {
			if a.Serving && a.Instance < o.me.Instance {
				o.lose(fmt.Sprintf("%s serves this name too and started first", a))
				return
			}
		}
	}
}

// lose ends this instance's ownership: nothing more is written.
func (o *owner) lose(why string) {
	o.lostMu.Do(func() {
		o.lost.Store(why)
		errorf("FENCED: this instance no longer owns its participant name; it writes nothing more and exits", "participant", o.name, "reason", why)
		close(o.lostCh)
	})
}

// check runs inside every write batch before COMMIT.
func (o *owner) check(t *sql.Tx) error {
	if why, ok := o.lost.Load().(string); ok {
		return fmt.Errorf("fenced: %s", why)
	}
	var epoch int64
	if err := t.QueryRow("SELECT epoch FROM owner WHERE id = 1").Scan(&epoch); err != nil {
		return fmt.Errorf("reading the owner epoch: %w", err)
	}
	if epoch != o.epoch {
		why := fmt.Sprintf("the database was taken by epoch %d; this instance holds epoch %d", epoch, o.epoch)
		o.lose(why)
		return fmt.Errorf("fenced: %s", why)
	}
	return nil
}

// release stops claiming the name (at shutdown, after the drain).
func (o *owner) release() {
	o.claim.Store(false)
	select {
	case <-o.stopped:
	default:
		close(o.stopped)
	}
	if o.sub != nil {
		_ = o.sub.Unsubscribe()
	}
}
