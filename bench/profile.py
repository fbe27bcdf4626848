"""Sampling profiles of running stack processes with py-spy (every thread, so the workflow
activations the SDK runs off the event loop are seen too), summarised per function."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path

from bench.procs import tool

# Our code, as py-spy names it (shortened file names).
OURS = ("api/", "core/", "activities/", "workflows/", "worker.py", "devsinks/")


def record(pid: int, raw: Path) -> subprocess.Popen[bytes]:
    raw.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            tool("py-spy"),
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--rate",
            "100",
            "--nonblocking",
            "--function",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(recorder: subprocess.Popen[bytes]) -> None:
    recorder.send_signal(signal.SIGINT)
    try:
        recorder.wait(30)
    except subprocess.TimeoutExpired:
        recorder.kill()
        recorder.wait(5)


def summarize(raw: Path, *, top: int = 25) -> dict[str, object]:
    """Inclusive and self share of the samples per function, from py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    if not raw.exists():
        return {"samples": 0, "inclusive": [], "self": [], "ours": []}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def ours(frame: str) -> bool:
        function, _, where = frame.partition(" (")
        return (
            function != "<module>" and where.startswith(OURS) and not where.startswith("worker.py")
        )

    def share(counter: Counter[str], only_ours: bool = False) -> list[tuple[str, float]]:
        rows = [
            (frame, 100 * n / total)
            for frame, n in counter.most_common()
            if not only_ours or ours(frame)
        ]
        return rows[:top]

    return {
        "samples": total,
        "inclusive": share(inclusive),
        "self": share(own),
        "ours": share(inclusive, only_ours=True),
    }


def write_text(summary: dict[str, object], out: Path, title: str) -> None:
    lines = [f"{title}: {summary['samples']} samples (100/s, active threads only)", ""]
    for key in ("ours", "self", "inclusive"):
        lines.append(f"-- {key} (% of samples)")
        rows = summary[key]
        assert isinstance(rows, list)
        lines += [f"{pct:6.1f}%  {frame}" for frame, pct in rows]
        lines.append("")
    out.write_text("\n".join(lines))
