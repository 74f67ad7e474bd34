#!/usr/bin/env python3
"""Where multi-turn conversations started, from `router-bench quality --records`.

For each records CSV given (e.g. DIR/multi-turn-c4-router-daemon-w1.csv), counts
the first turns that went to an engine serving more conversations at that moment
than the least busy engine: a conversation is active on the engine that served its
latest turn, from its first turn until its last ends. Also prints the TTFT mean
and p99 (the same rank the report uses), the first turns per engine, and the
eight slowest requests as (turn, engine, TTFT ms).

Usage: bench/scripts/first-turns.py DIR/multi-turn-*.csv
"""
import collections
import csv
import sys


def analyse(path):
    rows = list(csv.DictReader(open(path, newline="")))
    for r in rows:
        for k in ("sent_ms", "ttft_ms", "e2e_ms"):
            r[k] = float(r[k])
    rows.sort(key=lambda r: r["sent_ms"])
    by_session = collections.defaultdict(list)
    for r in rows:
        by_session[r["session"]].append(r)
    engines = sorted({r["served_by"] for r in rows})
    beside = 0
    firsts = [r for r in rows if r["turn"] == "0"]
    for first in firsts:
        now = first["sent_ms"]
        active = dict.fromkeys(engines, 0)
        for session, turns in by_session.items():
            if session == first["session"]:
                continue
            sent = [t for t in turns if t["sent_ms"] <= now]
            if not sent:
                continue
            latest = sent[-1]
            more = len(sent) < len(turns)
            if more or latest["sent_ms"] + latest["e2e_ms"] > now:
                active[latest["served_by"]] += 1
        if active[first["served_by"]] > min(active.values()):
            beside += 1
    ttft = sorted(r["ttft_ms"] for r in rows)
    p99 = ttft[int(len(ttft) * 0.99)]
    split = collections.Counter(r["served_by"] for r in firsts)
    slowest = sorted(rows, key=lambda r: -r["ttft_ms"])[:8]
    print(
        f"{path}: {beside} of {len(firsts)} first turns beside another conversation; "
        f"TTFT mean {sum(ttft) / len(ttft):.1f} p99 {p99:.1f} ms; "
        f"first turns per engine {sorted(split.values())}; slowest "
        f"{[(r['turn'], r['served_by'], round(r['ttft_ms'])) for r in slowest]}"
    )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        analyse(path)
