"""The complexity profile: every type's time and peak memory as the sequence grows, the
fitted log-log slopes beside the complexity the specification claims, plots.

Usage: ``python benchmarks/complexity_profile.py [--full]`` (or ``--report-only JSON`` to
redo the table and plots from saved results). Runs ``test_types_scaling.py`` under
pytest-benchmark (quick: a few minutes on 2 CPU cores; ``--full``: larger sizes, three
rounds), saves the JSON under ``benchmarks/results/<device>/``, writes the table between the
profile markers of ``benchmarks/RESULTS.md`` and PNG plots under ``benchmarks/plots/``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scaling import loglog_slope  # noqa: E402

BEGIN, END = "<!-- profile:begin -->", "<!-- profile:end -->"


def claimed(name: str) -> str:
    from canvas_engineering import ATTENTION_TYPES

    found = re.findall(r"O\([^)]*\)", ATTENTION_TYPES[name])
    return found[-1] if found else "?"


def run(full: bool) -> Path:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = HERE / "results" / device / f"{datetime.date.today()}-profile-{'full' if full else 'quick'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PROFILE": "full" if full else "quick"}
    command = [sys.executable, "-m", "pytest", str(HERE / "test_types_scaling.py"), "-v", "-p", "no:randomly",
               f"--benchmark-json={out}", "--benchmark-disable-gc", "--benchmark-columns=median"]
    subprocess.run(command, env=env, check=True)
    return out


def report(json_path: Path, full: bool) -> None:
    data = json.loads(json_path.read_text())
    series = defaultdict(list)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        size = info["n"] if info["sweep"] == "N=M" else info["m"]
        series[(info["type"], info["sweep"])].append((size, bench["stats"]["median"], max(info["peak_bytes"], 1)))
    rows = []
    for (name, sweep), points in sorted(series.items()):
        points.sort()
        sizes = [p[0] for p in points]
        rows.append((name, sweep, claimed(name), loglog_slope(sizes, [p[1] for p in points]),
                     loglog_slope(sizes, [p[2] for p in points]), points[-1][1] * 1e3, points[-1][2] / 2**20, sizes[-1]))
    machine = data["machine_info"]
    lines = [
        BEGIN,
        f"Measured {datetime.date.today()} on {machine['cpu'].get('brand_raw', machine['machine'])} "
        f"({os.cpu_count()} cores), Python {platform.python_version()}, torch {__import__('torch').__version__}; "
        f"`python benchmarks/complexity_profile.py{' --full' if full else ''}` (one run; data: `{json_path.relative_to(HERE.parent)}`).",
        "Forward+backward of one module, d_model 256, 4 heads, batch 1; N = M growing, or M growing",
        "with N = 256. Slopes are least-squares fits of log(time) and log(peak memory) on log(size).",
        "",
        "| type | sweep | claimed | time slope | memory slope | time at largest (ms) | peak MiB at largest | largest |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.1f} | {r[7]} |" for r in rows]
    lines.append(END)
    results = HERE / "RESULTS.md"
    text = results.read_text()
    block = "\n".join(lines)
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text += "\n## Per-type complexity profile\n\n" + block + "\n"
    results.write_text(text)
    plot(series)


def plot(series) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = HERE / "plots"
    plots.mkdir(exist_ok=True)
    for sweep in sorted({s for _, s in series}):
        figure, axes = plt.subplots(1, 2, figsize=(13, 5))
        for (name, this_sweep), points in sorted(series.items()):
            if this_sweep != sweep:
                continue
            sizes = [p[0] for p in points]
            axes[0].loglog(sizes, [p[1] * 1e3 for p in points], marker="o", label=name)
            axes[1].loglog(sizes, [p[2] / 2**20 for p in points], marker="o", label=name)
        for axis, unit in zip(axes, ("time (ms)", "peak memory (MiB)")):
            lo, hi = axis.get_xlim()
            ys = axis.get_ylim()
            for slope, style in ((1, ":"), (2, "--")):
                axis.loglog([lo, hi], [ys[0], ys[0] * (hi / lo) ** slope], "k" + style, linewidth=0.8, label=f"slope {slope}")
            axis.set_ylim(ys)
            axis.set_xlabel("M" if sweep == "N=256" else "N = M")
            axis.set_ylabel(unit)
            axis.grid(True, which="both", linewidth=0.3)
        axes[1].legend(fontsize=7, ncol=2)
        figure.suptitle(f"forward+backward per type, {sweep}")
        figure.tight_layout()
        figure.savefig(plots / f"profile-{sweep.replace('=', '')}.png", dpi=110)
        plt.close(figure)


if __name__ == "__main__":
    full = "--full" in sys.argv
    if "--report-only" in sys.argv:
        report(Path(sys.argv[-1]).resolve(), full)
    else:
        report(run(full), full)
