"""The complexity profile: every registered attention name's time and peak memory as the
sequence grows, forward and forward+backward, the fitted log-log slopes beside the
complexity the specification claims, the speed against canvas-engineering 0.5.0, plots.

Usage::

    python benchmarks/complexity_profile.py [--full | --smoke] [-k EXPR] [--json PATH]
                                            [--results PATH] [--plots DIR]
    python benchmarks/complexity_profile.py --report-only JSON [--results PATH] [--plots DIR]

Runs ``test_types_scaling.py`` under pytest-benchmark with its progress on the terminal
(quick: sizes 256 to 4096, one round; ``--full``: 512 to 16384, three rounds; ``--smoke``:
sizes 64 and 128, a check of the pipeline only; ``-k`` selects tests as in pytest), saves
the JSON (default ``benchmarks/results/<device>/<date>-profile-<profile>.json``), writes the
table between the profile markers of the results file (default ``benchmarks/RESULTS.md``)
and PNG plots into the plots folder (default ``benchmarks/plots/``). ``--report-only``
redoes the table and the plots from a saved JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scaling import MODES, loglog_slope  # noqa: E402

BEGIN, END = "<!-- profile:begin -->", "<!-- profile:end -->"
FLAGS = {"quick": "", "full": " --full", "smoke": " --smoke"}
Point = tuple[int, float, int]


def claimed(name: str) -> str:
    """The complexity the type's class claims, e.g. ``O(NM)`` (an alias, ``self_attention``,
    names the class of the type it stands for)."""
    from canvas_engineering import BUILTIN_ATTENTION

    return BUILTIN_ATTENTION[name].complexity


def run(profile: str, select: str, json_path: Path) -> int:
    """Runs the profile's benchmarks (``select``: a pytest ``-k`` expression, or empty),
    writing pytest-benchmark's JSON of the passed ones to ``json_path``; returns pytest's
    exit status."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE / "test_types_scaling.py"),
        "-v",
        "--capture=tee-sys",
        "-p",
        "no:randomly",
        "-o",
        "console_output_style=count",
        f"--benchmark-json={json_path}",
        "--benchmark-disable-gc",
        "--benchmark-columns=median",
    ]
    if select:
        command += ["-k", select]
    start = time.perf_counter()
    status = subprocess.run(command, env={**os.environ, "PROFILE": profile}).returncode
    print(f"profile {profile}: {time.perf_counter() - start:.0f} s, pytest exit status {status}")
    return status


def load(data: dict) -> tuple[dict[tuple[str, str, str], list[Point]], dict[tuple[str, str, str], dict]]:
    """(series, peers) from pytest-benchmark's JSON: ``series[(type, sweep, mode)]`` is the
    sorted list of (size, median seconds, peak bytes), where size is N for the N = M sweep
    and M otherwise; ``peers[(type, sweep, mode)]`` the peer's record (test_types_scaling)."""
    series, peers = defaultdict(list), {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["type"], info["sweep"], info["mode"])
        series[key].append(
            (info["n"] if info["sweep"] == "N=M" else info["m"], bench["stats"]["median"], max(info["peak_bytes"], 1))
        )
        if "peer" in info:
            peers[key] = info["peer"]
    return {key: sorted(points) for key, points in series.items()}, peers


def slope(points: list[Point], column: int) -> str:
    return f"{loglog_slope([p[0] for p in points], [p[column] for p in points]):.2f}" if len(points) > 1 else "–"


def size_label(sweep: str, n: int, m: int) -> str:
    return f"N=M={n}" if sweep == "N=M" else f"M={m}"


def speed(points: list[Point], sweep: str, peer: dict) -> str:
    """The peer's median time over ours at the size the peer ran, as ``2.31x``."""
    ours = {p[0]: p[1] for p in points}.get(peer["n"] if sweep == "N=M" else peer["m"]) if "times_s" in peer else None
    return "–" if ours is None else f"{statistics.median(peer['times_s']) / ours:.2f}x"


def compared_at(sweep: str, peer: dict) -> str:
    """Where the peer was measured, and where one of its calls took too long."""
    too_slow = ", ".join(size_label(sweep, n, m) for n, m in peer["too_slow"])
    parts = [size_label(sweep, peer["n"], peer["m"])] if "times_s" in peer else []
    if too_slow:
        parts.append(f"0.5.0 over {peer['limit_s']:g} s a call at {too_slow}")
    if "failed" in peer:
        parts.append("0.5.0 failed (its error is in the JSON)")
    return "; ".join(parts)


def table(data: dict, json_shown: str) -> list[str]:
    """The markdown block between the profile markers."""
    series, peers = load(data)
    first = data["benchmarks"][0]["extra_info"]
    machine = data["machine_info"]
    lines = [
        BEGIN,
        f"Measured {data['datetime'][:10]} on {machine['cpu'].get('brand_raw', machine['machine'])} "
        f"({machine['cpu'].get('count', '?')} cores, device {first['device']}), "
        f"Python {machine['python_version']}, torch {first['torch']}; "
        f"`python benchmarks/complexity_profile.py{FLAGS[first['profile']]}` (one run; data: `{json_shown}`).",
        "One module, d_model 256, 4 heads, batch 1; N = M growing, or M growing with N = 256. fwd: the call a",
        "training step makes, without its backward; fwd+bwd: with `output.sum().backward()`. Slopes are",
        "least-squares fits of log(time) and log(peak memory) on log(size). Speed vs 0.5.0: canvas-engineering",
        "0.5.0's median time over ours, same call, at the size in the last column (above 1: faster than 0.5.0).",
        "",
        "| type | sweep | claimed | time slope fwd | time slope fwd+bwd | memory slope fwd | memory slope fwd+bwd "
        "| fwd ms at largest | fwd+bwd ms at largest | fwd+bwd peak MiB at largest | largest "
        "| speed vs 0.5.0 fwd | speed vs 0.5.0 fwd+bwd | 0.5.0 compared at |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, sweep in sorted({key[:2] for key in series}):
        by_mode = {mode: series.get((name, sweep, mode), []) for mode in MODES}
        peer_by_mode = {mode: peers.get((name, sweep, mode), {"too_slow": []}) for mode in MODES}
        cells = [name, sweep, claimed(name)]
        cells += [slope(by_mode[mode], 1) for mode in MODES] + [slope(by_mode[mode], 2) for mode in MODES]
        cells += [f"{by_mode[mode][-1][1] * 1e3:.1f}" if by_mode[mode] else "–" for mode in MODES]
        backward = by_mode["forward+backward"]
        cells += [f"{backward[-1][2] / 2**20:.1f}", str(backward[-1][0])] if backward else ["–", "–"]
        cells += [speed(by_mode[mode], sweep, peer_by_mode[mode]) for mode in MODES]
        cells.append(compared_at(sweep, peer_by_mode["forward+backward"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(END)
    return lines


def write_table(lines: list[str], results_path: Path) -> None:
    """Replaces the block between the profile markers of ``results_path`` (or appends one)."""
    text = results_path.read_text() if results_path.exists() else ""
    block = "\n".join(lines)
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text += "\n## Per-type complexity profile\n\n" + block + "\n"
    results_path.write_text(text)


def plot(series: dict[tuple[str, str, str], list[Point]], plots_dir: Path) -> None:
    """One figure of time and peak memory per (sweep, mode), with reference slopes 1 and 2:
    ``profile-NM.png``, ``profile-N256.png`` (forward+backward), ``...-forward.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    for sweep, mode in sorted({key[1:] for key in series}):
        figure, axes = plt.subplots(1, 2, figsize=(13, 5))
        for (name, this_sweep, this_mode), points in sorted(series.items()):
            if (this_sweep, this_mode) != (sweep, mode):
                continue
            sizes = [p[0] for p in points]
            axes[0].loglog(sizes, [p[1] * 1e3 for p in points], marker="o", label=name)
            axes[1].loglog(sizes, [p[2] / 2**20 for p in points], marker="o", label=name)
        for axis, unit in zip(axes, ("time (ms)", "peak memory (MiB)")):
            lo, hi = axis.get_xlim()
            ys = axis.get_ylim()
            for reference, style in ((1, ":"), (2, "--")):
                axis.loglog(
                    [lo, hi],
                    [ys[0], ys[0] * (hi / lo) ** reference],
                    "k" + style,
                    linewidth=0.8,
                    label=f"slope {reference}",
                )
            axis.set_ylim(ys)
            axis.set_xlabel("M" if sweep == "N=256" else "N = M")
            axis.set_ylabel(unit)
            axis.grid(True, which="both", linewidth=0.3)
        axes[1].legend(fontsize=7, ncol=2)
        figure.suptitle(f"{mode} per type, {sweep}")
        figure.tight_layout()
        suffix = "" if mode == "forward+backward" else f"-{mode}"
        figure.savefig(plots_dir / f"profile-{sweep.replace('=', '')}{suffix}.png", dpi=110)
        plt.close(figure)


def report(json_path: Path, results_path: Path, plots_dir: Path) -> None:
    """Writes the table into ``results_path`` and the plots into ``plots_dir``."""
    data = json.loads(json_path.read_text())
    shown = json_path.relative_to(HERE.parent) if json_path.is_relative_to(HERE.parent) else json_path
    write_table(table(data, str(shown)), results_path)
    plot(load(data)[0], plots_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument(
        "--full", action="store_const", dest="profile", const="full", help="sizes 512 to 16384, three rounds"
    )
    profile.add_argument(
        "--smoke", action="store_const", dest="profile", const="smoke", help="sizes 64 and 128: checks the pipeline"
    )
    parser.add_argument("-k", default="", help="pytest -k expression selecting tests, e.g. 'copy or rwkv'")
    parser.add_argument("--json", type=Path, help="where the benchmark JSON goes")
    parser.add_argument(
        "--report-only", type=Path, metavar="JSON", help="only redo the table and the plots from this JSON"
    )
    parser.add_argument(
        "--results", type=Path, default=HERE / "RESULTS.md", help="the markdown file that gets the table"
    )
    parser.add_argument("--plots", type=Path, default=HERE / "plots", help="the folder that gets the plots")
    args = parser.parse_args()
    status = 0
    if args.report_only:
        json_path = args.report_only.resolve()
    else:
        import torch

        profile_name = args.profile or "quick"
        device = "cuda" if torch.cuda.is_available() else "cpu"
        json_path = (
            args.json or HERE / "results" / device / f"{datetime.date.today()}-profile-{profile_name}.json"
        ).resolve()
        status = run(profile_name, args.k, json_path)
    if json_path.exists():
        report(json_path, args.results.resolve(), args.plots.resolve())
    sys.exit(status)


if __name__ == "__main__":
    main()
