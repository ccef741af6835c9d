#!/usr/bin/env python3
"""Draws the failover figures (the Backdoors talk's "Failover throughput" and "Failover latency")
from a CSV written by tests/benches/failover.rs: one row per 100 ms bucket of the clients' view.

Usage: plot_failover.py CSV OUT_BASE TITLE FAULT_MS TAKEOVER_MS
Writes OUT_BASE.svg and OUT_BASE.png. FAULT_MS and TAKEOVER_MS are ms on the CSV's time axis.
Needs python3-matplotlib (Debian).
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    path, out, title, fault_ms, takeover_ms = sys.argv[1:]
    fault_s, takeover_s = float(fault_ms) / 1000, float(takeover_ms) / 1000
    t, per_s, p50, p99 = [], [], [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            t.append(float(row["t_ms"]) / 1000)
            per_s.append(float(row["per_s"]))
            p50.append(float(row["p50_ms"]) if row["p50_ms"] else float("nan"))
            p99.append(float(row["p99_ms"]) if row["p99_ms"] else float("nan"))
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.step(t, per_s, where="post", color="tab:blue")
    a.set_ylabel("replies / s (100 ms buckets)")
    a.set_title(title)
    b.step(t, p50, where="post", color="tab:green", label="median")
    b.step(t, p99, where="post", color="tab:red", label="p99")
    b.set_yscale("log")
    b.set_ylabel("latency, ms")
    b.set_xlabel("time, s (from the first request)")
    b.legend(loc="upper left")
    for ax in (a, b):
        ax.axvline(fault_s, color="black", linestyle="--", linewidth=1)
        ax.axvline(takeover_s, color="tab:orange", linestyle=":", linewidth=1)
        ax.grid(True, alpha=0.3)
    a.text(fault_s, a.get_ylim()[1] * 0.95, " fault", va="top")
    a.text(takeover_s, a.get_ylim()[1] * 0.8, " standby takes over", va="top", color="tab:orange")
    fig.tight_layout()
    fig.savefig(out + ".svg")
    fig.savefig(out + ".png", dpi=100)


if __name__ == "__main__":
    main()
