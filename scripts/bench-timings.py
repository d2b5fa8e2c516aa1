#!/usr/bin/env python3
"""Where a purchase's time goes at concurrency 1, from the services' logs.

Run the bench with the services' info lines and the participants' timings
kept, then point this at the data folder:

    twopc bench --cluster 3 --concurrency 1 --failover none \
        --service-log "info,twopc_participants=debug,twopc_common::db=trace" \
        --data-dir /tmp/bench-logs
    scripts/bench-timings.py /tmp/bench-logs/single /tmp/bench-logs/cluster

Per system, medians (µs) over the transactions the coordinator logged from
begun to delivered: phase 1 (begun -> the second vote), the decision write
(second vote -> "decision durable"), the coordinator's reply to the next
purchase's arrival (closed loop at concurrency 1: reply, client, request),
and each participant's prepare log write (queue, SQL, fsync) and batch
fsync. Logging costs CPU: compare the two systems of one run, not these
figures with an unlogged run.
"""
import glob
import os
import re
import statistics
import sys
from datetime import datetime

LINE = re.compile(
    r"^(\S+Z)\s+INFO tx\{tx=([0-9a-f-]+) [^}]*\}: "
    r"(transaction begun|vote|decision durable|decision delivered)"
)
EVENTS = ("transaction begun", "vote", "decision durable", "decision delivered")


def micros(stamp):
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp() * 1e6


def median(v):
    return round(statistics.median(v)) if v else None


def coordinator(folder):
    by_tx = {}
    for path in glob.glob(os.path.join(folder, "coordinator*.log")):
        for line in open(path, errors="replace"):
            m = LINE.match(line)
            if not m:
                continue
            t, tx, what = micros(m.group(1)), m.group(2), m.group(3)
            e = by_tx.setdefault(tx, {})
            if what == "vote":
                e["vote"] = max(e.get("vote", 0), t)
            else:
                e.setdefault(what, t)
    rows = sorted(
        (e for e in by_tx.values() if all(k in e for k in EVENTS)),
        key=lambda e: e["transaction begun"],
    )
    turn = [
        b["transaction begun"] - a["decision durable"]
        for a, b in zip(rows, rows[1:])
        if 0 < b["transaction begun"] - a["decision durable"] < 1e6
    ]
    print(
        f"{folder}: {len(rows)} transactions; p50 µs: "
        f"phase 1 {median([e['vote'] - e['transaction begun'] for e in rows])}, "
        f"decision write {median([e['decision durable'] - e['vote'] for e in rows])}, "
        f"begun -> durable {median([e['decision durable'] - e['transaction begun'] for e in rows])}, "
        f"durable -> next begun {median(turn)}, "
        f"durable -> delivered {median([e['decision delivered'] - e['decision durable'] for e in rows])}"
    )


def participants(folder):
    for service in ("wallet", "order"):
        path = os.path.join(folder, f"{service}.log")
        if not os.path.exists(path):
            continue
        text = open(path, errors="replace").read()
        writes = [int(x) for x in re.findall(r"prepare\{[^\n]*timings log_us=(\d+)", text)]
        fsyncs = [int(x) for x in re.findall(r"batch durable jobs=\d+ exec_us=\d+ commit_us=(\d+)", text)]
        print(
            f"  {service}: prepare log write p50 {median(writes)} µs ({len(writes)}), "
            f"batch fsync p50 {median(fsyncs)} µs ({len(fsyncs)})"
        )


for folder in sys.argv[1:]:
    coordinator(folder)
    participants(folder)
