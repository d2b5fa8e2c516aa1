package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"twopc/protocol"
)

// Config is the service's settings: flags, each defaulting to an
// environment variable (the same variables the Rust participants read).
type Config struct {
	Name            string // participant name (subjects, queue group, logs)
	NatsURL         string // NATS_URL
	NkeyFile        string // NATS_NKEY: seed file
	InboxPrefix     string // NATS_INBOX_PREFIX; default _INBOX_<seed file stem>
	DataDir         string // TWOPC_DATA_DIR
	DBPath          string // TWOPC_DB; default <data dir>/<name>.db
	Window          protocol.TxWindow
	InDoubtAfter    time.Duration // TWOPC_IN_DOUBT_AFTER_MS
	RecoveryEvery   time.Duration // TWOPC_RECOVERY_INTERVAL_MS
	DecisionTimeout time.Duration // TWOPC_DECISION_TIMEOUT_MS
	MaxInflight     int           // TWOPC_MAX_INFLIGHT
	SingleInstance  bool          // TWOPC_SINGLE_INSTANCE: skip the owner check
}

func envOr(name, def string) string {
	if v, ok := os.LookupEnv(name); ok && v != "" {
		return v
	}
	return def
}

func envInt(name string, def int64) int64 {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %s=%q is not an integer\n", name, v)
		os.Exit(2)
	}
	return n
}

// ParseConfig reads flags (args) over the environment and checks them.
func ParseConfig(args []string) (Config, error) {
	fs := flag.NewFlagSet("twopc-shipping", flag.ContinueOnError)
	var c Config
	var windowMs, retentionMs, skewMs, inDoubtMs, recoveryMs, decisionMs, inflight int64
	fs.StringVar(&c.Name, "name", envOr("TWOPC_PARTICIPANT_NAME", "shipping"), "participant name (TWOPC_PARTICIPANT_NAME)")
	fs.StringVar(&c.NatsURL, "nats-url", envOr("NATS_URL", "nats://127.0.0.1:4222"), "NATS server URL(s), comma-separated (NATS_URL)")
	fs.StringVar(&c.NkeyFile, "nkey", envOr("NATS_NKEY", ""), "NKey user seed file (NATS_NKEY)")
	fs.StringVar(&c.InboxPrefix, "inbox-prefix", envOr("NATS_INBOX_PREFIX", ""), "reply subject prefix (NATS_INBOX_PREFIX; default _INBOX_<seed file name>)")
	fs.StringVar(&c.DataDir, "data-dir", envOr("TWOPC_DATA_DIR", "data"), "folder of the SQLite database (TWOPC_DATA_DIR)")
	fs.StringVar(&c.DBPath, "db", envOr("TWOPC_DB", ""), "SQLite database file (TWOPC_DB; default <data-dir>/<name>.db)")
	fs.Int64Var(&windowMs, "tx-window-ms", envInt("TWOPC_TX_WINDOW_MS", protocol.DefaultWindow.WindowMs), "transaction window W (TWOPC_TX_WINDOW_MS)")
	fs.Int64Var(&retentionMs, "retention-ms", envInt("TWOPC_RETENTION_MS", protocol.DefaultWindow.RetentionMs), "retention H (TWOPC_RETENTION_MS)")
	fs.Int64Var(&skewMs, "max-skew-ms", envInt("TWOPC_MAX_SKEW_MS", protocol.DefaultWindow.MaxSkewMs), "tolerated clock skew S (TWOPC_MAX_SKEW_MS)")
	fs.Int64Var(&inDoubtMs, "in-doubt-after-ms", envInt("TWOPC_IN_DOUBT_AFTER_MS", 5_000), "ask the coordinator about a branch prepared this long (TWOPC_IN_DOUBT_AFTER_MS)")
	fs.Int64Var(&recoveryMs, "recovery-interval-ms", envInt("TWOPC_RECOVERY_INTERVAL_MS", 1_000), "how often to look for in-doubt branches (TWOPC_RECOVERY_INTERVAL_MS)")
	fs.Int64Var(&decisionMs, "decision-timeout-ms", envInt("TWOPC_DECISION_TIMEOUT_MS", 2_000), "timeout of one decision query (TWOPC_DECISION_TIMEOUT_MS)")
	fs.Int64Var(&inflight, "max-inflight", envInt("TWOPC_MAX_INFLIGHT", 4_096), "requests handled at once per subject; more get busy (TWOPC_MAX_INFLIGHT)")
	fs.BoolVar(&c.SingleInstance, "single-instance", envOr("TWOPC_SINGLE_INSTANCE", "") != "", "do not ask on twopc.<name>.owner whether another instance serves (TWOPC_SINGLE_INSTANCE)")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := protocol.CheckName(c.Name); err != nil {
		return c, fmt.Errorf("participant name %v", err)
	}
	w, err := protocol.NewTxWindow(windowMs, retentionMs, skewMs)
	if err != nil {
		return c, err
	}
	c.Window = w
	if inDoubtMs < 0 || recoveryMs <= 0 || decisionMs <= 0 || inflight <= 0 {
		return c, fmt.Errorf("in-doubt-after-ms must not be negative, and recovery-interval-ms, decision-timeout-ms and max-inflight must be positive")
	}
	c.InDoubtAfter = time.Duration(inDoubtMs) * time.Millisecond
	c.RecoveryEvery = time.Duration(recoveryMs) * time.Millisecond
	c.DecisionTimeout = time.Duration(decisionMs) * time.Millisecond
	c.MaxInflight = int(inflight)
	if c.DBPath == "" {
		c.DBPath = filepath.Join(c.DataDir, c.Name+".db")
	}
	if c.InboxPrefix == "" && c.NkeyFile != "" {
		// As the Rust services: creds/shipping.nk → _INBOX_shipping, the
		// only inbox the generated permissions let this identity use.
		stem := strings.TrimSuffix(filepath.Base(c.NkeyFile), filepath.Ext(c.NkeyFile))
		c.InboxPrefix = "_INBOX_" + stem
	}
	return c, nil
}

var flagHelp = flag.ErrHelp

func dirOf(path string) string { return filepath.Dir(path) }
