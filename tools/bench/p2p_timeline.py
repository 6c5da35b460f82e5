"""Where a distribution's time goes, from the per-chunk traces the mounts write with
MOONCAKEFS_P2P_TRACE=DIR (``mooncakefs.p2p.swarm.Trace``): per reader and file, the copy's length, the
time its reader sat waiting on chunks (and on which), the last tenth of the copy (what was fetched then,
from whom, how long each took), the time with nothing in flight, and what each source served.

    MOONCAKEFS_P2P_TRACE=/tmp/trace python3 tools/bench/p2p_bench.py --readers 4 --files 1
    python3 tools/bench/p2p_timeline.py /tmp/trace
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def union_s(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of ``intervals``."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def load(folder: Path) -> dict[tuple[int, str], list[dict]]:
    """Events by (inode, reader node), in time order."""
    out: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("*.jsonl")):
        node = path.name.rsplit("-", 1)[0]
        for line in path.read_text().splitlines():
            ev = json.loads(line)
            out[(ev["ino"], node)].append(ev)
    for evs in out.values():
        evs.sort(key=lambda e: e["t"])
    return out


def describe(ino: int, node: str, evs: list[dict], start: float) -> None:
    opened = next((e["t"] for e in evs if e["ev"] == "opened"), evs[0]["t"])
    closed = next((e["t"] for e in evs if e["ev"] == "closed"), evs[-1]["t"])
    span = closed - opened
    fetches = [e for e in evs if e["ev"] == "fetch"]
    waits = [e for e in evs if e["ev"] == "read_wait"]
    tail_from = closed - span / 10
    busy = union_s([(e["t0"], e["t"]) for e in fetches])
    blocked = union_s([(e["t0"], e["t"]) for e in waits])
    by_src: dict[str, list[float]] = defaultdict(list)
    for e in fetches:
        if e["ok"]:
            by_src[e["src"]].append(e["t"] - e["t0"])
    last_start = max((e["t0"] for e in fetches), default=opened)
    print(
        f"ino {ino} reader {node}: open +{opened - start:.2f}s, closed +{closed - start:.2f}s ({span:.2f}s); "
        f"{sum(1 for e in fetches if e['ok'])} chunks fetched, fetching {busy:.2f}s (idle {span - busy:.2f}s); "
        f"reader blocked {blocked:.2f}s on {len(waits)} chunks; last fetch started {closed - last_start:.2f}s "
        f"before close; failed tries {sum(1 for e in fetches if not e['ok'])}"
    )
    print("   per source: " + ", ".join(f"{s}: {len(d)} x {sum(d) / len(d):.2f}s" for s, d in sorted(by_src.items())))
    tail = [e for e in fetches if e["t"] >= tail_from]
    tail_blocked = union_s([(max(e["t0"], tail_from), e["t"]) for e in waits if e["t"] >= tail_from])
    print(f"   last tenth ({span / 10:.2f}s): reader blocked {tail_blocked:.2f}s; fetches ending then:")
    for e in tail:
        print(
            f"      chunk {e['idx']:3d} from {e['src']:9s} +{e['t0'] - start:6.2f} .. +{e['t'] - start:6.2f} "
            f"({e['t'] - e['t0']:.2f}s) ok={e['ok']} ranked={e.get('ranked')} by {e['thread'][-12:]}"
        )
    for e in waits:
        if e["t"] - e["t0"] > 0.15:
            print(f"   reader waited {e['t'] - e['t0']:.2f}s for chunk {e['idx']} at +{e['t0'] - start:.2f}s")


def serving(by_reader: dict[tuple[int, str], list[dict]]) -> None:
    """Per file, each source's uplink: busy time (some chunk going out) and chunks served."""
    per: dict[int, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for (ino, _node), evs in by_reader.items():
        for e in evs:
            if e["ev"] == "fetch" and e["ok"]:
                per[ino][e["src"]].append((e["t0"], e["t"]))
    for ino, sources in per.items():
        print(
            f"ino {ino} sources: "
            + ", ".join(f"{s}: {len(iv)} chunks, busy {union_s(iv):.2f}s" for s, iv in sorted(sources.items()))
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    by_reader = load(args.folder)
    starts: dict[int, float] = {}
    for (ino, _), evs in by_reader.items():
        starts[ino] = min(starts.get(ino, evs[0]["t"]), evs[0]["t"])
    for (ino, node), evs in sorted(by_reader.items()):
        describe(ino, node, evs, starts[ino])
    serving(by_reader)


if __name__ == "__main__":
    main()
