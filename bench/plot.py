#!/usr/bin/python3
"""Plots the raw end-to-end benchmark results (JSON lines written by the
e2e tools' --json FILE) as PNGs:

  throughput_vs_concurrency.png  evmesh inproc msg/s per handler concurrency
                                 (throughput rows of e2e_inproc), with the
                                 naive CAF pipeline of the same runs
  latency_cdf.png                latency CDF of every latency row (the last
                                 one per tool and row)
  soak_rss.png                   RSS over the soak (soak_sample rows), if any

Usage: bench/plot.py OUT_DIR FILE.jsonl [FILE.jsonl ...]
Needs matplotlib for Debian's python (apt-get install -y python3-matplotlib;
add --no-install-recommends if apt proposes conflicting -dev packages) and
runs with /usr/bin/python3 (a pyenv or venv python does not see it).
"""
import json
import sys
from collections import defaultdict


def load(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line:
                    rows.append(json.loads(line))
    return rows


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/plot.py needs matplotlib: apt-get install -y "
              "python3-matplotlib, then run it with /usr/bin/python3 "
              "(this is %s)" % sys.executable, file=sys.stderr)
        return 1
    out = sys.argv[1].rstrip("/")
    rows = load(sys.argv[2:])
    made = []

    # Throughput vs concurrency (e2e_inproc throughput rows).
    mesh = defaultdict(list)
    naive = defaultdict(list)
    for r in rows:
        if r.get("tool") != "e2e_inproc" or r.get("kind") != "throughput":
            continue
        if r["row"].startswith("evmesh"):
            mesh[r["concurrency"]].append(r)
        elif r["row"] == "naive CAF pipeline":
            naive[r.get("date", "")].append(r)
    if mesh:
        xs = sorted(mesh)
        ys = [max(x["msg_per_s"] for x in mesh[c]) for c in xs]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, ys, "o-", label="evmesh inproc, guarantees on")
        nv = [x["msg_per_s"] for v in naive.values() for x in v]
        if nv:
            ax.axhline(sorted(nv)[len(nv) // 2], color="gray", ls="--",
                       label="naive CAF pipeline (median of the same runs)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("handler concurrency (lanes)")
        ax.set_ylabel("msg/s")
        ax.set_ylim(bottom=0)
        loads = [x["loadavg_1m"] for c in xs for x in mesh[c]]
        ax.set_title("Throughput vs concurrency (%d cores, load %.1f-%.1f)"
                     % (mesh[xs[0]][0]["cores"], min(loads), max(loads)),
                     fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out + "/throughput_vs_concurrency.png"
        fig.savefig(path, dpi=110)
        made.append(path)

    # Latency CDF.
    # One line per (tool, row): the last one in the input.
    last = {}
    for r in rows:
        if r.get("kind") == "latency" and r.get("sorted_us_sample"):
            last[(r["tool"], r["row"])] = r
    lat = list(last.values())
    if lat:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in lat:
            s = r["sorted_us_sample"]
            ys = [i / (len(s) - 1) if len(s) > 1 else 1 for i in range(len(s))]
            ax.plot([max(v, 1) / 1000.0 for v in s], ys,
                    label="%s @ %.0f msg/s (p99 %.1f ms)"
                    % (r["row"], r["offered_msg_per_s"], r["p99_us"] / 1000))
        ax.set_xscale("log")
        ax.set_xlabel("latency, publish to handler (ms, log)")
        ax.set_ylabel("fraction of messages")
        ax.set_title("Latency CDF at about half the maximum rate", fontsize=10)
        ax.legend(fontsize=6.5, loc="upper left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out + "/latency_cdf.png"
        fig.savefig(path, dpi=110)
        made.append(path)

    # Soak RSS, one line per soak (rows without dedupe_keep_s: keep 60 s).
    soaks = defaultdict(list)
    for r in rows:
        if r.get("kind") == "soak_sample":
            soaks[(r.get("dedupe_keep_s", 60), r["rate"])].append(r)
    if soaks:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for (keep, rate), samples in sorted(soaks.items()):
            ax.plot([r["t_s"] for r in samples],
                    [r["rss_bytes"] / 1048576 for r in samples], "o-", ms=3,
                    label="%.0f msg/s, dedupe.keep %d s" % (rate, keep))
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_title("evmesh inproc soak: RSS every 10 s", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out + "/soak_rss.png"
        fig.savefig(path, dpi=110)
        made.append(path)

    if not made:
        print("no throughput, latency or soak rows in the input",
              file=sys.stderr)
        return 1
    for p in made:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
