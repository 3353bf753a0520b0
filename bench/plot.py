"""Plot broadcast results: delivered frames/s and p99 latency against subscriber count, per server.

`python -m bench.plot bench/results/broadcast-….json [more.json …] --out docs/bench-broadcast.png`

Reads the JSON that `python -m bench.broadcast` writes (several files are merged; a later file wins
for the same server and subscriber count) and draws three panels: saturated frames/s, server CPU µs
per delivered frame (saturated), and p99 publish→receive latency at the fixed rate. Needs the
`bench` extra (matplotlib): `make bench` installs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

COLOURS = {"engine": "#1f6feb", "naive": "#d1242f", "engine-redis-2w": "#8250df"}
LABELS = {
    "engine": "viral-engine (1 process, memory://)",
    "naive": "naive Starlette baseline",
    "engine-redis-2w": "viral-engine (2 workers, redis://)",
}


def load(paths: list[Path]) -> tuple[dict[tuple[str, int], dict[str, Any]], list[dict[str, Any]]]:
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    sources = []
    for path in paths:
        data = orjson.loads(path.read_bytes())
        sources.append(
            {"file": path.name, "args": data.get("args", {}), "environment": data.get("environment")}
        )
        for run in data["runs"]:
            runs[(run["server"], run["subscribers"])] = run
    return runs, sources


def plot(runs: dict[tuple[str, int], dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    panels = [
        ("saturated", "frames_per_s", "delivered frames/s (saturated)", 1e-3, "thousand frames/s"),
        ("saturated", "server_cpu_us_per_frame", "server CPU per delivered frame (saturated)", 1, "µs"),
        ("fixed_rate", "p99", "p99 publish→receive at the fixed rate", 1, "ms"),
    ]
    servers = sorted(
        {server for server, _ in runs}, key=lambda s: list(COLOURS).index(s) if s in COLOURS else 9
    )
    for ax, (phase, key, heading, scale, unit) in zip(axes, panels, strict=True):
        for server in servers:
            points = []
            for (kind, n), run in sorted(runs.items(), key=lambda item: item[0][1]):
                if kind != server:
                    continue
                data = run["phases"].get(phase)
                if not data:
                    continue
                value = data["latency_ms"].get(key) if key == "p99" else data.get(key)
                if value is not None:
                    points.append((n, value * scale))
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", color=COLOURS.get(server), label=LABELS.get(server, server))
        ax.set_title(heading)
        ax.set_xlabel("subscribers on the topic")
        ax.set_ylabel(unit)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="broadcast results JSON files")
    parser.add_argument("--out", type=Path, default=Path("docs/bench-broadcast.png"))
    args = parser.parse_args(argv)
    runs, sources = load(args.results)
    files = ", ".join(s["file"] for s in sources)
    env = sources[-1]["environment"] or {}
    title = (
        f"Broadcast fan-out, one topic, 64-byte payload — {env.get('cpus', '?')} cores, "
        f"Python {env.get('python', '?')}, client: Node ws, other processes, same machine ({files})"
    )
    plot(runs, args.out, title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
