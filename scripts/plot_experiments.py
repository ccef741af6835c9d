#!/usr/bin/env python3
"""Draws the evaluation's figures (docs/evaluation.md) from the CSV files `make experiments`
writes into DIR, each as DIR/<name>.svg and DIR/<name>.png next to its CSV:

  fig2-cpu-<engine>.csv, fig2-io-<engine>.csv, fig3-mem-<engine>.csv  (tests/benches/experiments.rs)
      useful's mean iteration time vs the fault's processes, one line per healer
  table1-<engine>.csv                                                 (tests/benches/bdmon.rs)
      repair time vs fork-bomb processes, per engine, with the paper's Table 1
  monitor-cpu.csv                                                     (tests/benches/bdmon.rs)
      the monitor's CPU use vs its sampling period, with the paper's figures
  service-<engine>-<attack>.csv (+ -marks.csv)                        (tests/benches/service.rs)
      redis p99 latency over time through an attack healed by bdmon, then one not healed

Usage: plot_experiments.py DIR        Needs python3-matplotlib (Debian).
"""
import csv
import glob
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HEALERS = {
    "none": ("no healer", "tab:red", "o"),
    "nproc": ("RLIMIT_NPROC = 64", "tab:orange", "s"),
    "earlyoom": ("earlyoom in the guest", "tab:purple", "s"),
    "bdmon": ("bdmon (remote)", "tab:green", "^"),
}
FAULTS = {
    "fig2-cpu": ("Figure 2a: CPU-bound fork bomb", "fork-bomb processes"),
    "fig2-io": ("Figure 2b: I/O-bound fork bomb", "fork-bomb processes"),
    "fig3-mem": ("Figure 3: memory hog (16 MiB per child)", "memory-hog processes"),
}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def save(fig, base):
    fig.tight_layout()
    fig.savefig(base + ".svg")
    fig.savefig(base + ".png", dpi=100)
    plt.close(fig)
    print("wrote", base + ".svg", base + ".png")


def fault_figure(path):
    base = path[: -len(".csv")]
    name = os.path.basename(base)
    kind, engine = name.rsplit("-", 1)
    title, xlabel = FAULTS[kind]
    data = rows(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for healer, (label, color, marker) in HEALERS.items():
        pts = [(num(r["x"]), num(r["mean_ms"])) for r in data if r["healer"] == healer]
        pts = [(x, y) for x, y in pts if y == y]
        if pts:
            ax.plot(*zip(*pts), marker=marker, color=color, label=label)
    base_ms = sorted(num(r["baseline_ms"]) for r in data if num(r["baseline_ms"]) == num(r["baseline_ms"]))
    if base_ms:
        b = base_ms[len(base_ms) // 2]
        ax.axhline(b, color="gray", linestyle="--", linewidth=1, label="baseline (no fault) %.0f ms" % b)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("useful's mean iteration time, ms (log)")
    ax.set_title("%s, %s engine" % (title, engine))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save(fig, base)


def table1_figure(paths):
    data = [r for p in paths for r in rows(p)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"tcg": "tab:blue", "kvm": "tab:green"}
    for engine in sorted({r["engine"] for r in data}):
        pts = [(num(r["processes"]), num(r["median_ms"])) for r in data if r["engine"] == engine]
        label = "bdmon, %s engine (median)" % engine
        if engine == "kvm":
            label += ", nested: not hardware"
        ax.plot(*zip(*pts), marker="o", color=colors.get(engine), label=label)
    paper = sorted({(num(r["processes"]), num(r["paper_ms"])) for r in data if num(r["paper_ms"]) > 0})
    if paper:
        ax.plot(*zip(*paper), marker="x", linestyle=":", color="black", label="paper (2004, FreeBSD, Myrinet)")
    ax.set_xlabel("fork-bomb processes")
    ax.set_ylabel("repair time, ms (HM called -> all gone)")
    ax.set_title("Table 1: repair time vs processes")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save(fig, os.path.join(os.path.dirname(paths[0]), "table1"))


def cpu_figure(path):
    data = rows(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    periodic = [r for r in data if num(r["period_ms"]) > 0]
    ax.plot([num(r["period_ms"]) for r in periodic], [num(r["cpu_percent"]) for r in periodic],
            marker="o", color="tab:blue", label="bdmon (100-sensor box over mutual TLS)")
    paper = [(num(r["period_ms"]), num(r["paper_percent"])) for r in periodic if r["paper_percent"]]
    if paper:
        ax.plot(*zip(*paper), marker="x", linestyle="", markersize=10, color="black", label="paper")
    for r in data:
        if num(r["period_ms"]) == 0:
            txt = "busy loop: %.0f%% (%s samples/s)" % (num(r["cpu_percent"]), r["samples_per_s"])
            if r["paper_percent"]:
                txt += "; paper %s%%" % r["paper_percent"]
            ax.text(0.02, 0.02, txt, transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling period, ms (log)")
    ax.set_ylabel("monitor CPU, % of one core (log)")
    ax.set_title("Monitor CPU use vs sampling period")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save(fig, path[: -len(".csv")])


def service_figure(path):
    base = path[: -len(".csv")]
    marks = {}
    if os.path.exists(base + "-marks.csv"):
        marks = {r["mark"]: num(r["t_ms"]) for r in rows(base + "-marks.csv")}
    data = rows(path)
    # Every window, a gap (NaN) where one timed out or failed: no line across a crippled stretch.
    t = [num(r["start_ms"]) / 1000 for r in data]
    val = lambda r, k: num(r[k]) if r["outcome"] == "done" else float("nan")  # noqa: E731
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.step(t, [val(r, "p99_ms") for r in data], where="post", color="tab:red", label="p99")
    ax.step(t, [val(r, "p50_ms") for r in data], where="post", color="tab:blue", label="median")
    lost = [num(r["start_ms"]) / 1000 for r in data if r["outcome"] != "done"]
    if lost:
        ax.plot(lost, [ax.get_ylim()[1]] * len(lost), "kx", label="window timed out / failed")
    if "baseline_p99_ms" in marks:
        ax.axhline(marks["baseline_p99_ms"], color="gray", linestyle="--", linewidth=1, label="baseline p99")
    for key, label, color in (("healed_attack", "attack (bdmon on)", "tab:green"),
                              ("last_repair", "bdmon's last repair", "tab:green"),
                              ("unhealed_attack", "attack (no healer)", "tab:red")):
        if key in marks:
            ax.axvline(marks[key] / 1000, color=color, linestyle=":" if key == "last_repair" else "--")
            ax.text(marks[key] / 1000, ax.get_ylim()[1], " " + label, rotation=90, va="top", fontsize=8)
    if "unhealed_attack" in marks and "unhealed_over" in marks:
        ax.axvspan(marks["unhealed_attack"] / 1000, marks["unhealed_over"] / 1000, color="tab:red", alpha=0.08)
    ax.set_yscale("log")
    ax.set_xlabel("time, s (from the load's start; 1 s redis-benchmark windows)")
    ax.set_ylabel("redis latency, ms (log)")
    _, engine, attack = os.path.basename(base).split("-", 2)
    ax.set_title("redis under a %s attack, %s engine: healed by bdmon, then not" % (attack, engine))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    save(fig, base)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    drawn = 0
    for kind in FAULTS:
        for p in sorted(glob.glob(os.path.join(d, kind + "-*.csv"))):
            fault_figure(p)
            drawn += 1
    t1 = sorted(glob.glob(os.path.join(d, "table1-*.csv")))
    if t1:
        table1_figure(t1)
        drawn += 1
    p = os.path.join(d, "monitor-cpu.csv")
    if os.path.exists(p):
        cpu_figure(p)
        drawn += 1
    for p in sorted(glob.glob(os.path.join(d, "service-*.csv"))):
        if not p.endswith("-marks.csv"):
            service_figure(p)
            drawn += 1
    if drawn == 0:
        sys.exit("plot_experiments: no experiment CSV in %s" % d)


if __name__ == "__main__":
    main()
