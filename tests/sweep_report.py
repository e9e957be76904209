"""Run the input sweep of tests/test_sweep.py and print the table of docs/reliability.md.

PYTHONPATH=. python tests/sweep_report.py            # the markdown table
PYTHONPATH=. python tests/sweep_report.py --details  # plus every case that is not as expected
"""

from __future__ import annotations

import collections
import sys

from tests.test_sweep import CASES, classify

OUTCOMES = ("correct", "clear error", "silent wrong", "unclear error")


def main() -> None:
    rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad = []
    for case in CASES:
        outcome, detail = classify(case)
        rows[case.category][outcome] += 1
        want = "correct" if case.error is None else "clear error"
        if outcome != want:
            bad.append((case, outcome, detail))
    print("| category | cases tried | correct results | clear errors | silent wrong results | unclear errors |")
    print("|---|---:|---:|---:|---:|---:|")
    total: collections.Counter = collections.Counter()
    for cat, c in rows.items():
        total.update(c)
        print(f"| {cat} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |")
    print(f"| **all** | **{sum(total.values())}** | " + " | ".join(f"**{total[o]}**" for o in OUTCOMES) + " |")
    if "--details" in sys.argv:
        for case, outcome, detail in bad:
            print(f"\n{case.category} / {case.name}: {outcome}\n  {detail}")
    if bad:
        print(f"\n{len(bad)} case(s) not as expected", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
