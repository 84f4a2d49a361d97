#!/usr/bin/env python3
"""Draws a pis-soak CSV (src/bin/pis-soak.rs) as a PNG: worker RSS over time with the payments it
holds, and the restore time and records read at each restart.

usage: plot_soak.py SOAK_CSV OUT_PNG

Needs matplotlib; scripts/soak.sh installs it into a venv under .tools/.
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    meta, rows = {}, []
    with open(path, newline="") as f:
        lines = []
        for line in f:
            if line.startswith("#"):
                key, _, value = line[1:].strip().partition("=")
                meta[key] = value
            else:
                lines.append(line)
    for row in csv.DictReader(lines):
        rows.append(row)
    return meta, rows


def num(row, key, scale=1.0):
    value = row.get(key, "")
    return float(value) / scale if value not in ("", None) else None


def series(rows, key, scale=1.0, events=None):
    xs, ys = [], []
    for row in rows:
        if events and row["event"] not in events:
            continue
        if not events and row["event"] == "restart" and xs:
            # No samples while the workers restart: break the line rather than draw one.
            xs.append(xs[-1])
            ys.append(float("nan"))
        y = num(row, key, scale)
        if y is not None:
            xs.append(float(row["elapsed_secs"]) / 60)
            ys.append(y)
    return xs, ys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    meta, rows = read(sys.argv[1])
    if not rows:
        sys.exit(f"plot_soak: no rows in {sys.argv[1]}")
    retention = float(meta.get("retention_secs", "0"))
    retired = float(meta.get("retired_ids_retention_secs", "0"))
    horizon_min = (retention + retired) / 60
    settled = max(int(r["settled"] or 0) for r in rows)

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    fig.suptitle(
        f"pis-worker soak: {settled:,} payments settled at {meta.get('rate', '?')}/s, "
        f"{meta.get('workers', '?')} worker(s), {meta.get('partitions', '?')} partitions\n"
        f"retention {retention:.0f} s, retired ids {retired:.0f} s; "
        f"restart every {meta.get('restart_every_secs', '?')} s",
        fontsize=10,
    )

    x, y = series(rows, "worker_rss_bytes", 1e6)
    top.plot(x, y, color="tab:blue", linewidth=1.5, label="worker RSS (MB)")
    top.set_ylabel("worker RSS (MB)", color="tab:blue")
    top.set_ylim(bottom=0, top=max([v for v in y if v == v] + [1]) * 1.15)
    top.grid(alpha=0.3)
    right = top.twinx()
    x, y = series(rows, "payments_in_memory", 1e3)
    right.plot(x, y, color="tab:orange", linewidth=1, label="payments in memory (k)")
    x, y = series(rows, "retired_ids", 1e3)
    right.plot(x, y, color="tab:green", linewidth=1, linestyle="--", label="retired ids (k)")
    right.set_ylabel("thousands")
    right.set_ylim(bottom=0)
    handles = top.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    top.legend(handles=handles, loc="lower right", fontsize=8)

    for ax in (top, bottom):
        ax.axvspan(0, horizon_min, color="grey", alpha=0.12, linewidth=0)
        for row in rows:
            if row["event"] == "restart":
                ax.axvline(float(row["elapsed_secs"]) / 60, color="grey", alpha=0.35, linewidth=0.6)
    top.text(
        horizon_min / 2, top.get_ylim()[1] * 0.95, "before the\nhorizons",
        ha="center", va="top", fontsize=7, color="dimgrey",
    )

    x, y = series(rows, "restore_secs", events={"start", "restart"})
    bottom.plot(x, y, "o-", color="tab:red", markersize=4, linewidth=1,
                label="longest partition restore (s)")
    x, y = series(rows, "ready_secs", events={"start", "restart"})
    bottom.plot(x, y, "s:", color="tab:purple", markersize=3, linewidth=1,
                label="start to ready (s)")
    bottom.set_ylabel("seconds")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    records = bottom.twinx()
    x, y = series(rows, "restore_records", 1e3, events={"start", "restart"})
    records.bar(x, y, width=max(x + [1]) / 120, color="tab:gray", alpha=0.45,
                label="records read (k)")
    records.set_ylabel("records read (k)")
    records.set_ylim(bottom=0)
    bottom.set_zorder(records.get_zorder() + 1)
    bottom.patch.set_visible(False)
    handles = bottom.get_legend_handles_labels()[0] + records.get_legend_handles_labels()[0]
    bottom.legend(handles=handles, loc="upper left", fontsize=8)
    bottom.set_xlabel("minutes since start (grey lines: worker restarts)")

    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)
    print(f"plot_soak: {sys.argv[2]}")


if __name__ == "__main__":
    main()
