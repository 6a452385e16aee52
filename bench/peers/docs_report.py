#!/usr/bin/env python3
"""Print bench/documents.sh's results as markdown tables.

  docs_report.py RESULTS.tsv RSS.tsv LOAD.tsv
RESULTS rows: server, op, rps, p50_us, p99_us, requests, non2xx, socket_errors, cpu_us_per_req
"""
import sys

# Parse Server 9 + PostgreSQL 15 as recorded in shared/notes/PEERS.md (same box, same wrk)
PARSE_PEERS_MD = {"get": 1890, "query": 1111, "create": 1417}
OPS = [("get", "GET by id"), ("query", "filtered list of 20 + count"), ("create", "create")]


def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) < 9:
                continue
            rows[(p[0], p[1])] = {
                "rps": float(p[2]), "p50": int(p[3]) / 1000, "p99": int(p[4]) / 1000,
                "requests": int(p[5]), "non2xx": int(p[6]), "errors": int(p[7]),
                "cpu": int(p[8])}
    return rows


def cell(r):
    if r is None:
        return "–"
    bad = f" ⚠ {r['non2xx']} non-2xx" if r["non2xx"] else ""
    bad += f" ⚠ {r['errors']} socket errors" if r["errors"] else ""
    return f"{r['rps']:,.0f} rps, p99 {r['p99']:.2f} ms{bad}"


def main():
    rows = load(sys.argv[1])
    rss = {}
    if len(sys.argv) > 2:
        with open(sys.argv[2]) as f:
            for line in f:
                p = line.rstrip("\n").split("\t")
                if len(p) == 3:
                    rss[p[0]] = int(p[2])
    servers = []
    for (s, op) in rows:
        if not op.startswith("owner@") and s not in servers:
            servers.append(s)
    pb = next((s for s in servers if s.startswith("PocketBase")), None)
    parse = next((s for s in servers if s.startswith("Parse")), None)
    bs, bp = "basalt-sqlite", "basalt-postgres"

    if servers:
        print("| op | " + " | ".join(servers) + " |")
        print("|---|" + "---|" * len(servers))
        for op, label in OPS:
            print(f"| {label} | " + " | ".join(cell(rows.get((s, op))) for s in servers) + " |")
        print()
        print("Ratios (throughput ×, p99 as basalt / peer; target: SQLite ≥ 2× PocketBase with "
              "p99 no worse, PostgreSQL ≥ 5× Parse):")
        print()
        print("| op | basalt-SQLite / PocketBase | p99 basalt-SQLite vs PocketBase | "
              "basalt-PG / Parse (this run) | basalt-PG / Parse (PEERS.md) |")
        print("|---|---|---|---|---|")
        for op, label in OPS:
            a, b = rows.get((bs, op)), rows.get((pb, op)) if pb else None
            c, d = rows.get((bp, op)), rows.get((parse, op)) if parse else None
            r1 = f"{a['rps'] / b['rps']:.2f}× {'✓' if a['rps'] >= 2 * b['rps'] else '✗'}" if a and b else "–"
            r2 = (f"{a['p99']:.2f} vs {b['p99']:.2f} ms {'✓' if a['p99'] <= b['p99'] else '✗'}"
                  if a and b else "–")
            r3 = f"{c['rps'] / d['rps']:.2f}× {'✓' if c['rps'] >= 5 * d['rps'] else '✗'}" if c and d else "–"
            r4 = (f"{c['rps'] / PARSE_PEERS_MD[op]:.2f}× "
                  f"{'✓' if c['rps'] >= 5 * PARSE_PEERS_MD[op] else '✗'}" if c else "–")
            print(f"| {label} | {r1} | {r2} | {r3} | {r4} |")
        print()
        print("Server process CPU per request (µs; PostgreSQL's own CPU not included) and RSS "
              "after the run:")
        print()
        print("| server | " + " | ".join(l for _, l in OPS) + " | RSS after |")
        print("|---|" + "---|" * (len(OPS) + 1))
        for s in servers:
            cpus = [str(rows[(s, op)]["cpu"]) if (s, op) in rows else "–" for op, _ in OPS]
            mem = f"{rss[s] / 1024:.0f} MB" if s in rss else "–"
            print(f"| {s} | " + " | ".join(cpus) + f" | {mem} |")
        print()
    if len(sys.argv) > 3:
        with open(sys.argv[3]) as f:
            loads = [l.rstrip("\n").split("\t") for l in f if "\t" in l]
        if loads:
            print("1-minute load average when each server started (2 cores; anything well above "
                  "0 is other work competing with the benchmark): "
                  + ", ".join(f"{n} {v}" for n, v in loads))
            print()

    owner = sorted(((s, op) for (s, op) in rows if op.startswith("owner@")),
                   key=lambda k: (k[0], int(k[1].split("@")[1])))
    if owner:
        print("Owner-rule query (`todos`, read: `auth != null && resource.data.owner == auth.uid`, "
              "user owns 100 documents, `{\"limit\": 20}`):")
        print()
        print("| server | documents | rps | p50 | p99 | non-2xx |")
        print("|---|---|---|---|---|---|")
        for s, op in owner:
            r = rows[(s, op)]
            print(f"| {s} | {int(op.split('@')[1]):,} | {r['rps']:,.0f} | {r['p50']:.2f} ms | "
                  f"{r['p99']:.2f} ms | {r['non2xx']} |")
        print()


if __name__ == "__main__":
    main()
