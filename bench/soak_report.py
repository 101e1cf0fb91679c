"""The soak's verdict, its page (docs/soak.md) and its plot (docs/soak.png), from the samples bench.soak took.

A resource is *bounded* when, after the warm-up, the median of the last quarter of the run is within a small
tolerance of the median of the second quarter; its least-squares slope per hour is shown beside it. Tables
that keep history on purpose (sessions, the audit chain, lane evidence) grow with the number of sessions:
for them the page gives rows per session in each half of the run, which must stay the same.
"""

from __future__ import annotations

import statistics
from pathlib import Path

# append-only by design: the record of what happened (retention is an operator's decision, docs/audit.md)
# kept for a fixed time, then pruned by the agent: tombstones of sessions closed or removed on the node, so a
# re-sent or restored desired state cannot reopen them (nodeagent/agent.py TOMBSTONE_RETENTION_S, 7 days)
RETAINED = ("state_closed", "state_removed", "agent_state_files", "agent_state_kb")
HISTORY = ("rows_events", "rows_access_sessions", "rows_lane_evidence", "rows_session_approvals", "rows_audit_checkpoints",
           "rows_session_recordings", "db_kb")
WARMUP = 0.10  # the first tenth of the samples: caches, the first lanes, SQLite growing its file
# (what, tolerance in its unit, and a relative one) for everything that must stay flat
BOUNDED = {
    "agent_rss_kb": 4096, "agent_fds": 3, "agent_threads": 2,
    "controller_rss_kb": 8192, "controller_fds": 3, "controller_threads": 2,
    "wg_procs": 2, "wg_rss_kb": 16384, "router_links": 2, "lane_links": 2,
    "nft_elements": 12, "conntrack": 8, "state_lanes": 2, "state_evidence": 4, "state_flows": 2, "state_reports": 2,
}
RELATIVE = 0.10
LABELS = {
    "agent_rss_kb": "agent RSS (MB)", "controller_rss_kb": "controller RSS (MB)", "wg_rss_kb": "wireguard-go RSS, all lanes (MB)",
    "agent_fds": "agent fds", "controller_fds": "controller fds", "lane_links": "lane interfaces", "nft_elements": "nft elements",
    "conntrack": "conntrack entries", "state_closed": "tombstones: closed (kept 7 d)", "state_removed": "tombstones: removed (kept 7 d)",
    "state_evidence": "evidence not yet collected", "state_lanes": "lane records", "state_flows": "flow logs",
}


def verdict(samples: list[dict]) -> dict:
    """{"bounded": {metric: {...}}, "history": {metric: {...}}, "grew": [metrics that grew]}."""
    steady = samples[max(1, int(len(samples) * WARMUP)):]
    if len(steady) < 8:
        raise ValueError(f"{len(samples)} samples are too few to judge growth; run longer or sample more often")
    q = len(steady) // 4
    early, late = steady[q:2 * q], steady[-q:]
    out: dict = {"bounded": {}, "history": {}, "retained": {}, "grew": []}
    for metric, slack in BOUNDED.items():
        a, b = statistics.median(r[metric] for r in early), statistics.median(r[metric] for r in late)
        limit = a + max(slack, a * RELATIVE)
        row = {"early": a, "late": b, "max": max(r[metric] for r in steady), "per_hour": _slope_per_hour(steady, metric),
               "limit": limit, "ok": b <= limit}
        out["bounded"][metric] = row
        if not row["ok"]:
            out["grew"].append(metric)
    half = len(steady) // 2
    growing = [m for m in (*HISTORY, *RETAINED) if m in samples[0]]
    for metric in growing + sorted(m for m in samples[0] if m.startswith("rows_") and m not in HISTORY):
        first, second = _per_session(steady[: half + 1], metric), _per_session(steady[half:], metric)
        if metric in growing:
            same = first is None or second is None or abs(second - first) <= max(0.10 * abs(first), 0.05)
            out["retained" if metric in RETAINED else "history"][metric] = {
                "first_half": first, "second_half": second, "ok": same, "end": samples[-1][metric]}
            if not same:
                out["grew"].append(metric)
        else:  # any other table must not grow with sessions at all
            a, b = statistics.median(r[metric] for r in early), statistics.median(r[metric] for r in late)
            ok = b <= a + max(3, a * RELATIVE)
            out["bounded"][metric] = {"early": a, "late": b, "max": max(r[metric] for r in steady),
                                      "per_hour": _slope_per_hour(steady, metric), "limit": a + max(3, a * RELATIVE), "ok": ok}
            if not ok:
                out["grew"].append(metric)
    return out


def write_report(samples: list[dict], totals: dict, mach: dict, out: Path) -> dict:
    v = verdict(samples)
    out.mkdir(parents=True, exist_ok=True)
    plot(samples, out / "soak.png")
    (out / "soak.md").write_text(page(samples, totals, mach, v))
    return {"grew": v["grew"], "sessions": totals["sessions"], "errors": totals["errors"]}


def page(samples: list[dict], totals: dict, mach: dict, v: dict) -> str:
    hours = samples[-1]["t_s"] / 3600
    lines = [
        "# Soak",
        "",
        f"`make soak HOURS={hours:.2g}` on {mach['date']}: {mach['cpus']} × {mach['cpu']}, Linux {mach['kernel']}, "
        f"{mach['wireguard_go']}, Python {mach['python']}. The whole product in the lab (the controller on SQLite as its own "
        "process, the agent enrolled over the link, engineers with wg-quick); one engineer after another opens a session of the "
        "no-approval IEC-104 task every few seconds, imports its config and sends 200 kB to the RTU; every other session is closed "
        "at once, the rest end on the agent's clock.",
        "",
        f"**{totals['sessions']} sessions in {totals['wall_s'] / 3600:.2f} h** ({totals['closed_early']} closed by the engineer, "
        f"{totals['left_to_expire']} left to expire), {totals['bytes'] / 1e6:.0f} MB through lanes, "
        f"{totals['errors']} failed cycles{_errors(totals)}. After the last lane ended, left in the router's kernel: "
        f"{_leftovers(totals)}; {_drained(totals)}.",
        "",
        f"**Verdict: {'nothing grew without bound' if not v['grew'] else 'GREW: ' + ', '.join(v['grew'])}.** "
        f"{len(samples)} samples; the first {WARMUP:.0%} are warm-up. Bounded means the median of the last quarter is "
        f"within max(slack, {RELATIVE:.0%}) of the median of the second quarter.",
        "",
        "![soak](soak.png)",
        "",
        "| must stay flat | 2nd quarter (median) | last quarter (median) | max | slope per hour | bounded |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for metric, r in v["bounded"].items():
        lines.append(f"| {metric} | {r['early']:g} | {r['late']:g} | {r['max']:g} | {r['per_hour']:+.1f} | "
                     f"{'yes' if r['ok'] else '**no**'} |")
    lines += ["", "| history, kept on purpose | rows per session, 1st half | 2nd half | at the end | steady |", "|---|---:|---:|---:|---|"]
    for metric, r in v["history"].items():
        lines.append(f"| {metric} | {_num(r['first_half'])} | {_num(r['second_half'])} | {r['end']:g} | "
                     f"{'yes' if r['ok'] else '**no**'} |")
    lines += ["", "| kept 7 days, then pruned by the agent | per session, 1st half | 2nd half | at the end | steady |",
              "|---|---:|---:|---:|---|"]
    for metric, r in v["retained"].items():
        lines.append(f"| {metric} | {_num(r['first_half'])} | {_num(r['second_half'])} | {r['end']:g} | "
                     f"{'yes' if r['ok'] else '**no**'} |")
    lines += ["", "The agent keeps a small tombstone per session it closed or that the controller removed, so that a re-sent or "
              "restored desired state cannot reopen the lane; it prunes them 7 days after the session (TOMBSTONE_RETENTION_S), so "
              "they are bounded by a week of sessions, not by uptime. A soak shorter than that sees them grow at a steady rate per "
              "session, which is what the table checks."]
    lines += ["", "Raw samples: [bench/soak.csv](bench/soak.csv). History grows with use by design; docs/audit.md says how "
              "to export it, and that retention is not automated yet.", ""]
    return "\n".join(lines)


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in samples]
    panels = [
        ("memory (MB)", ["agent_rss_kb", "controller_rss_kb", "wg_rss_kb"], 1024),
        ("open file descriptors", ["agent_fds", "controller_fds"], 1),
        ("kernel objects on the router", ["lane_links", "nft_elements", "conntrack"], 1),
        ("agent state files", ["state_lanes", "state_evidence", "state_flows", "state_closed", "state_removed"], 1),
        ("history rows (grow by design)", ["rows_events", "rows_access_sessions", "rows_lane_evidence"], 1),
        ("sessions done", ["sessions"], 1),
    ]
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
    for ax, (title, metrics, scale) in zip(axes.flat, panels, strict=True):
        for m in metrics:
            if m in samples[0]:
                ax.plot(t, [r[m] / scale for r in samples], label=LABELS.get(m, m))
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("minutes")
    fig.suptitle("wicket soak: lanes opened and closed every few seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _slope_per_hour(rows: list[dict], metric: str) -> float:
    xs = [r["t_s"] / 3600 for r in rows]
    ys = [float(r[metric]) for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _per_session(rows: list[dict], metric: str) -> float | None:
    """Least-squares growth of `metric` per session over these samples (None: no sessions in them)."""
    xs = [float(r["sessions"]) for r in rows]
    if len(rows) < 2 or max(xs) == min(xs):
        return None
    ys = [float(r[metric]) for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _errors(totals: dict) -> str:
    last = list(dict.fromkeys(e[:160] for e in totals["last_errors"]))  # distinct, in order
    return f" (the last: {'; '.join(last[-2:])})" if last else ""


def _leftovers(totals: dict) -> str:
    left = totals.get("leftovers_after_last_lane") or {}
    found = {k: n for k, n in left.items() if n}
    return "nothing" if not found else ", ".join(f"{n} {k}" for k, n in found.items())


def _drained(totals: dict) -> str:
    d = totals.get("drained")
    if not d:
        return "not sampled"
    return (f"lane interfaces {d['lane_links']}, nft elements {d['nft_elements']} (the site's fixed ones), conntrack entries "
            f"{d['conntrack']}, lane records {d['state_lanes']}, evidence not yet collected {d['state_evidence']}, "
            f"agent fds {d['agent_fds']}, controller fds {d['controller_fds']}")
