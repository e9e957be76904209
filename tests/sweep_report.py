"""Run the input sweeps and print the tables of docs/reliability.md.

PYTHONPATH=. python tests/sweep_report.py              # tests/test_sweep.py's table
PYTHONPATH=. python tests/sweep_report.py --features   # tests/test_sweep_features.py's table
add --details to print every case that is not as expected
"""

from __future__ import annotations

import collections
import sys
from typing import Any

from tests.test_sweep import classify

OUTCOMES = ("correct", "clear error", "silent wrong", "unclear error")


def main() -> None:
    if "--features" in sys.argv:
        from tests.test_sweep_features import CASES
    else:
        from tests.test_sweep import CASES
    rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad = []
    for case in CASES:
        outcome, detail = classify(case)
        pending: Any = getattr(case, "xfail", None)  # a goal owned elsewhere, not met yet
        rows[case.category][outcome if not pending else f"{outcome} (pending)"] += 1
        want = "correct" if case.error is None else "clear error"
        if (outcome != want) != bool(pending):
            bad.append((case, outcome, detail))
    extra = "--features" in sys.argv  # the features sweep has a column for goals owned elsewhere
    head = "| category | cases tried | correct results | clear errors | silent wrong results | unclear errors |"
    print(head + (" pending (strict xfail) |" if extra else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if extra else ""))
    total: collections.Counter = collections.Counter()
    for cat, c in rows.items():
        total.update(c)
        pend = sum(v for k, v in c.items() if k.endswith("(pending)"))
        tail = f" {pend} |" if extra else ""
        print(f"| {cat} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |" + tail)
    pend = sum(v for k, v in total.items() if k.endswith("(pending)"))
    print(
        f"| **all** | **{sum(total.values())}** | "
        + " | ".join(f"**{total[o]}**" for o in OUTCOMES)
        + " |"
        + (f" **{pend}** |" if extra else "")
    )
    if "--details" in sys.argv:
        for case, outcome, detail in bad:
            print(f"\n{case.category} / {case.name}: {outcome}\n  {detail}")
    if bad:
        print(f"\n{len(bad)} case(s) not as expected", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
