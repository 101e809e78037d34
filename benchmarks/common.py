"""What every duet-rl benchmark shares: its common options and the provenance stored with its results."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_common_arguments(ap: argparse.ArgumentParser, quick_help: str, keep_help: str) -> None:
    """--model-cache, --out-dir, --quick and --keep-runs."""
    ap.add_argument("--model-cache", default="~/.cache/duet-rl")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--keep-runs", action="store_true", help=keep_help)


def provenance(script: str, argv: list[str] | None, started: datetime, load_before: list[float]) -> dict:
    """machine (with the load average before and now), date, duration and the command that ran."""
    return {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_avg_before": load_before,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "date": started.isoformat(timespec="seconds"),
        "duration_s": (datetime.now(timezone.utc) - started).total_seconds(),
        "command": "python "
        + shlex.join([f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)]),
    }
