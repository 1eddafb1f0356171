#!/usr/bin/env python3
"""Plot `timezero bench --json` per-writer figures: IOPS and p50 latency against writer count,
engine vs raw, for already-copied writes and first writes (copy-before-write + flush).

Usage:
    timezero bench --dir /var/tmp --writers 1,4,16,32 --json-out docs/bench-writers.json
    python3 scripts/plot-bench.py docs/bench-writers.json docs/bench-writers.png

Needs matplotlib (`pip install matplotlib`).
"""

import datetime
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def series(rows, figure, side, key):
    pts = sorted((r["writers"], r[side]) for r in rows if r["figure"] == figure)
    return [w for w, _ in pts], [s[key] for _, s in pts], pts


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "docs/bench-writers.json"
    dst = sys.argv[2] if len(sys.argv) > 2 else "docs/bench-writers.png"
    with open(src) as f:
        data = json.load(f)
    rows = data["by_writers"]
    g = data["global options"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    panels = [
        ("already-copied", "already-copied 4 KiB writes", "raw pwrite"),
        ("first-write", "first 4 KiB write to a grain + flush", "raw pwrite+fdatasync"),
    ]
    for col, (figure, title, raw_label) in enumerate(panels):
        ax = axes[0][col]
        for side, label, style in (("engine", "timezero engine", "o-"), ("raw", raw_label, "s--")):
            ws, med, pts = series(rows, figure, side, "iops_median")
            lo = [m - s["iops_min"] for m, (_, s) in zip(med, pts)]
            hi = [s["iops_max"] - m for m, (_, s) in zip(med, pts)]
            ax.errorbar(ws, med, yerr=[lo, hi], fmt=style, capsize=4, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["writers"] for r in rows if r["figure"] == figure])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.set_title(f"{title}: throughput")
        ax.set_xlabel("writer threads")
        ax.set_ylabel("IOPS (median, bars = min..max over rounds)")
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax = axes[1][col]
        for side, label, style in (("engine", "timezero engine", "o-"), ("raw", raw_label, "s--")):
            ws, p50, _ = series(rows, figure, side, "lat_p50_ns")
            _, p99, _ = series(rows, figure, side, "lat_p99_ns")
            line = ax.plot(ws, [x / 1e3 for x in p50], style, label=f"{label} p50")[0]
            ax.plot(ws, [x / 1e3 for x in p99], style, alpha=0.4, color=line.get_color(),
                    label=f"{label} p99")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([r["writers"] for r in rows if r["figure"] == figure])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_title(f"{title}: latency")
        ax.set_xlabel("writer threads")
        ax.set_ylabel("latency per write, us (log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    day = datetime.datetime.fromtimestamp(data["timestamp"], datetime.timezone.utc).date()
    fig.suptitle(
        f"timezero bench: {g['size'] >> 20} MiB volumes, {g['rounds']} rounds, 64 KiB grain, "
        f"backend {g['backend']}, buffered, measured {day}"
    )
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
