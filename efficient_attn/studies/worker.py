"""Measure one study point in a fresh process and print its row as JSON.

``python -m efficient_attn.studies.worker < point.json`` reads a payload made
by a study's ``points`` (its ``experiment`` field names the study) and prints
one JSON row on its last stdout line; failures become rows, never exceptions.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from efficient_attn.studies.base import Unsupported, new_row
from efficient_attn.sweep.worker import environment, looks_like_oom


def run_point(payload: dict[str, Any]) -> dict[str, Any]:
    """Measure ``payload``'s point and return its row."""
    from efficient_attn.studies import STUDIES

    start = time.perf_counter()
    study = STUDIES[payload["experiment"]]
    row = new_row(study, payload, "ok")
    try:
        row["env"] = environment()
        study.measure(payload, row)
    except Exception as e:
        text = f"{type(e).__name__}: {e}".strip() if not isinstance(e, Unsupported) else str(e)
        status = "unsupported" if isinstance(e, Unsupported) else "error"
        if looks_like_oom(text) and status == "error":
            status = "oom"
        row.update(dict.fromkeys(study.measurements), status=status, message=text[:2000])
    row["worker_s"] = time.perf_counter() - start
    return row


def main() -> int:
    payload = json.loads(sys.stdin.read())
    row = run_point(payload)
    try:
        text = json.dumps(row, allow_nan=False)
    except ValueError as e:  # a NaN or Inf measurement: the row says so instead
        from efficient_attn.studies import STUDIES

        failed = new_row(STUDIES[payload["experiment"]], payload, "error", f"ValueError: {e}")
        text = json.dumps({**failed, "env": row["env"], "worker_s": row["worker_s"]})
    sys.stdout.write("\n" + text + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
