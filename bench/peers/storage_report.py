#!/usr/bin/env python3
"""Print bench/storage.sh's results as markdown tables.

  storage_report.py RESULTS.tsv [RSS.tsv]
RESULTS rows: server, op, rps, p50_us, p99_us, requests, non2xx, socket_errors,
              cpu_us_per_req, aux_cpu_us_per_req ("-" when none), load1
"""
import sys

SIZES = {"4k": 4096, "1m": 1 << 20}
OPS = [("get-4k", "GET 4 KiB"), ("get-1m", "GET 1 MiB"), ("put-4k", "PUT 4 KiB"), ("put-1m", "PUT 1 MiB")]
SERVERS = [("basalt-local", "basalt, local disk"), ("basalt-s3", "basalt, S3 (SeaweedFS)"),
           ("seaweedfs", "SeaweedFS S3 direct")]


def main():
    rows = {}
    with open(sys.argv[1]) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) < 11:
                continue
            rows[(p[0], p[1])] = {
                "rps": float(p[2]), "p50": int(p[3]) / 1000, "p99": int(p[4]) / 1000,
                "requests": int(p[5]), "non2xx": int(p[6]), "errors": int(p[7]),
                "cpu": int(p[8]), "aux": p[9], "load": p[10]}
    rss = {}
    if len(sys.argv) > 2:
        with open(sys.argv[2]) as f:
            for line in f:
                p = line.split()
                if len(p) == 2:
                    rss[p[0]] = int(p[1]) // 1024

    print("| server | op | rps | p50 | p99 | MiB/s | server CPU µs/req | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for s, sname in SERVERS:
        for op, label in OPS:
            r = rows.get((s, op))
            if not r:
                continue
            mibs = r["rps"] * SIZES[op[-2:]] / (1 << 20)
            cpu = f"{r['cpu']}" + (f" (+ SeaweedFS {r['aux']})" if r["aux"] != "-" else "")
            bad = f" ⚠ {r['non2xx']} non-2xx" if r["non2xx"] else ""
            bad += f" ⚠ {r['errors']} socket errors" if r["errors"] else ""
            print(f"| {sname} | {label} | {r['rps']:,.0f}{bad} | {r['p50']:.2f} ms | {r['p99']:.2f} ms "
                  f"| {mibs:,.1f} | {cpu} | {r['load']} |")
    if rss:
        print()
        print("Peak RSS (VmHWM) of the server after its runs: " +
              ", ".join(f"{s} {v} MiB" for s, v in rss.items()))

    print()
    print("Targets (issue 9):")
    print()
    print("| target | measured | met |")
    print("|---|---|---|")
    for op, label in OPS[:2]:
        a, b = rows.get(("basalt-s3", op)), rows.get(("seaweedfs", op))
        if a and b:
            ratio = b["rps"] / a["rps"]
            print(f"| basalt-S3 {label} within 1.5× of SeaweedFS direct | SeaweedFS / basalt-S3 = "
                  f"{ratio:.2f}× rps ({a['rps'] / b['rps']:.2f} of its throughput); p50 "
                  f"{a['p50'] / b['p50']:.2f}×, p99 {a['p99'] / b['p99']:.2f}× | "
                  f"{'✓' if ratio <= 1.5 else '✗'} |")
    a = rows.get(("basalt-local", "get-4k"))
    if a:
        print(f"| basalt local-disk GET 4 KiB ≥ 10,000 rps | {a['rps']:,.0f} rps (load {a['load']}) | "
              f"{'✓' if a['rps'] >= 10000 else '✗'} |")


if __name__ == "__main__":
    main()
