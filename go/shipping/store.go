package main

// The SQLite database: one writer goroutine on one connection, which runs
// jobs in batches — each job in its own savepoint, the batch in one
// BEGIN IMMEDIATE … COMMIT — and answers every job of a batch only after its
// COMMIT returned (WAL with synchronous=FULL: the commit is fsynced). That
// is group commit: one fsync per batch, and nothing announced before it is
// durable. Reads (the public subjects, recovery's listing) use read-only
// connections of their own.

import (
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	_ "github.com/mattn/go-sqlite3"
)

const (
	// Jobs waiting for the writer, at most; more are refused as busy.
	writerQueue = 4096
	// Jobs in one batch (one transaction, one fsync), at most.
	maxBatch = 256
)

// ErrBusy: the writer's queue is full.
var ErrBusy = errors.New("the database writer's queue is full")

// ErrNotOwner: the batch was rolled back by the owner guard.
var ErrNotOwner = errors.New("not the owner")

// ErrClosed: the store is shutting down.
var ErrClosed = errors.New("the database is closed")

// migrations, applied in order once each (PRAGMA user_version).
var migrations = []string{`
CREATE TABLE branches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tx BLOB NOT NULL UNIQUE CHECK (length(tx) = 16),
    state TEXT NOT NULL CHECK (state IN ('prepared', 'committed', 'aborted')),
    op BLOB,
    code TEXT,
    message TEXT,
    prepared_at_ms INTEGER,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX branches_in_doubt ON branches (prepared_at_ms) WHERE state = 'prepared';
CREATE INDEX branches_prepared_by_tx ON branches (tx) WHERE state = 'prepared';
CREATE INDEX branches_decided ON branches (updated_at_ms) WHERE state != 'prepared';
-- Delivery slots: capacity = held (by prepared bookings) + booked + free.
CREATE TABLE slots (
    slot TEXT PRIMARY KEY,
    capacity INTEGER NOT NULL CHECK (capacity >= 0),
    held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0),
    booked INTEGER NOT NULL DEFAULT 0 CHECK (booked >= 0),
    created_at_ms INTEGER NOT NULL,
    CHECK (held + booked <= capacity)
);
-- One row per prepared, undecided booking.
CREATE TABLE holds (
    tx BLOB PRIMARY KEY CHECK (length(tx) = 16),
    slot TEXT NOT NULL REFERENCES slots (slot),
    user TEXT NOT NULL,
    qty INTEGER NOT NULL CHECK (qty > 0)
);
-- One row per committed booking.
CREATE TABLE bookings (
    tx BLOB PRIMARY KEY CHECK (length(tx) = 16),
    slot TEXT NOT NULL REFERENCES slots (slot),
    user TEXT NOT NULL,
    qty INTEGER NOT NULL CHECK (qty > 0),
    booked_at_ms INTEGER NOT NULL
);
-- The store's id (a UUIDv7 made with the database) and the epoch of the
-- instance that took it last.
CREATE TABLE owner (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    store TEXT NOT NULL,
    epoch INTEGER NOT NULL CHECK (epoch >= 0)
);
`}

// Job runs inside the writer's transaction, in a savepoint of its own; an
// error rolls back that savepoint only.
type Job func(tx *sql.Tx) (interface{}, error)

type jobReq struct {
	run  Job
	done chan jobResult
}

type jobResult struct {
	v   interface{}
	err error
}

// Store is the participant's database.
type Store struct {
	path   string
	w      *sql.DB
	r      *sql.DB
	jobs   chan jobReq
	closed chan struct{}
	done   chan struct{}
	// guard runs in every write batch just before its COMMIT; an error
	// rolls the batch back and fails each of its jobs with ErrNotOwner.
	guard func(*sql.Tx) error
}

func dsn(path string, params url.Values) string {
	return "file:" + (&url.URL{Path: path}).EscapedPath() + "?" + params.Encode()
}

// OpenStore opens (or makes) the database at path and migrates it.
func OpenStore(path string) (*Store, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	wp := url.Values{}
	wp.Set("_journal_mode", "WAL")
	wp.Set("_synchronous", "FULL")
	wp.Set("_busy_timeout", "5000")
	wp.Set("_foreign_keys", "1")
	wp.Set("_txlock", "immediate")
	w, err := sql.Open("sqlite3", dsn(path, wp))
	if err != nil {
		return nil, err
	}
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	w.SetConnMaxLifetime(0)
	s := &Store{path: path, w: w, jobs: make(chan jobReq, writerQueue), closed: make(chan struct{}), done: make(chan struct{})}
	if err := s.check(); err != nil {
		w.Close()
		return nil, err
	}
	if err := s.migrate(); err != nil {
		w.Close()
		return nil, err
	}
	rp := url.Values{}
	rp.Set("_busy_timeout", "5000")
	rp.Set("_query_only", "1")
	r, err := sql.Open("sqlite3", dsn(path, rp))
	if err != nil {
		w.Close()
		return nil, err
	}
	r.SetMaxOpenConns(4)
	s.r = r
	go s.writer()
	return s, nil
}

// check makes sure the settings durability rests on took effect.
func (s *Store) check() error {
	var mode string
	if err := s.w.QueryRow("PRAGMA journal_mode").Scan(&mode); err != nil {
		return fmt.Errorf("opening %s: %w", s.path, err)
	}
	var sync int
	if err := s.w.QueryRow("PRAGMA synchronous").Scan(&sync); err != nil {
		return err
	}
	var fk int
	if err := s.w.QueryRow("PRAGMA foreign_keys").Scan(&fk); err != nil {
		return err
	}
	if mode != "wal" || sync != 2 || fk != 1 {
		return fmt.Errorf("%s: journal_mode=%s synchronous=%d foreign_keys=%d; need wal, 2 (FULL) and 1", s.path, mode, sync, fk)
	}
	return nil
}

func (s *Store) migrate() error {
	var version int
	if err := s.w.QueryRow("PRAGMA user_version").Scan(&version); err != nil {
		return err
	}
	if version > len(migrations) {
		return fmt.Errorf("%s has schema version %d; this build knows %d", s.path, version, len(migrations))
	}
	for i := version; i < len(migrations); i++ {
		tx, err := s.w.Begin()
		if err != nil {
			return err
		}
		if _, err := tx.Exec(migrations[i]); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %d: %w", i+1, err)
		}
		if _, err := tx.Exec(fmt.Sprintf("PRAGMA user_version = %d", i+1)); err != nil {
			tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return err
		}
	}
	return nil
}

// Do runs job in the writer and returns once its batch is durable (or
// failed). ErrBusy at once when the queue is full.
func (s *Store) Do(job Job) (interface{}, error) {
	req := jobReq{run: job, done: make(chan jobResult, 1)}
	select {
	case <-s.closed:
		return nil, ErrClosed
	default:
	}
	select {
	case s.jobs <- req:
	default:
		return nil, ErrBusy
	}
	select {
	case r := <-req.done:
		return r.v, r.err
	case <-s.done:
		// The writer stopped; it may have answered just before.
		select {
		case r := <-req.done:
			return r.v, r.err
		default:
			return nil, ErrClosed
		}
	}
}

func (s *Store) writer() {
	defer close(s.done)
	for {
		var first jobReq
		select {
		case first = <-s.jobs:
		case <-s.closed:
			// Answer what is queued, then stop.
			for {
				select {
				case j := <-s.jobs:
					s.batch([]jobReq{j})
				default:
					return
				}
			}
		}
		batch := []jobReq{first}
	more:
		for len(batch) < maxBatch {
			select {
			case j := <-s.jobs:
				batch = append(batch, j)
			default:
				break more
			}
		}
		s.batch(batch)
	}
}

// batch runs jobs in one transaction and answers each after COMMIT.
func (s *Store) batch(jobs []jobReq) {
	results := make([]jobResult, len(jobs))
	fail := func(err error) {
		for _, j := range jobs {
			j.done <- jobResult{err: err}
		}
	}
	tx, err := s.w.Begin() // BEGIN IMMEDIATE (_txlock)
	if err != nil {
		fail(fmt.Errorf("begin: %w", err))
		return
	}
	for i, j := range jobs {
		if _, err := tx.Exec("SAVEPOINT job"); err != nil {
			tx.Rollback()
			fail(err)
			return
		}
		v, err := j.run(tx)
		if err != nil {
			if _, e := tx.Exec("ROLLBACK TO job"); e != nil {
				tx.Rollback()
				fail(e)
				return
			}
		}
		if _, e := tx.Exec("RELEASE job"); e != nil {
			tx.Rollback()
			fail(e)
			return
		}
		results[i] = jobResult{v, err}
	}
	if s.guard != nil {
		if err := s.guard(tx); err != nil {
			tx.Rollback()
			fail(fmt.Errorf("%w: this instance wrote nothing: %v", ErrNotOwner, err))
			return
		}
	}
	// Durable point: COMMIT returns after the WAL is fsynced
	// (synchronous=FULL); only then is anyone answered.
	if err := tx.Commit(); err != nil {
		fail(fmt.Errorf("commit: %w", err))
		return
	}
	for i, j := range jobs {
		j.done <- results[i]
	}
}

// Close stops the writer (after answering queued jobs) and closes the
// database.
func (s *Store) Close() {
	select {
	case <-s.closed:
		return
	default:
		close(s.closed)
	}
	<-s.done
	s.r.Close()
	s.w.Close()
}

// StoreID returns the database's store id and owner epoch, making the id
// when the database is new.
func (s *Store) StoreID() (string, int64, error) {
	_, err := s.w.Exec("INSERT OR IGNORE INTO owner (id, store, epoch) VALUES (1, ?, 0)", NewV7String())
	if err != nil {
		return "", 0, err
	}
	var store string
	var epoch int64
	err = s.w.QueryRow("SELECT store, epoch FROM owner WHERE id = 1").Scan(&store, &epoch)
	return store, epoch, err
}

// StartMark is the largest branch id now: every branch inserted later gets
// a larger one (AUTOINCREMENT), so branches at or below the mark were
// prepared before this process started.
func (s *Store) StartMark() (int64, error) {
	var mark int64
	err := s.w.QueryRow("SELECT coalesce(max(id), 0) FROM branches").Scan(&mark)
	return mark, err
}

func nowMs() int64 { return time.Now().UnixMilli() }
