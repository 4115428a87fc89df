#!/usr/bin/env python3
"""Per-stage local errors of a `moetrace check --json` report as a markdown
table: rel_l2 against the reference (median and largest over steps and
layers), the worst row's error and expected error, the largest ratio, and
the findings per stage.

    python3 scripts/check_table.py check.json > table.md
"""
import json
import statistics
import sys


def number(v):
    return float("inf") if isinstance(v, str) else float(v)


def main(path):
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    stages = {}
    for row in report["rows"]:
        m, e = row.get("metrics"), row.get("expected")
        if not m:
            continue
        s = stages.setdefault(row["stage"], {"rel": [], "ratio": [], "error": [], "expected": [], "findings": 0})
        s["rel"].append(number(m["rel_l2"]))
        if e:
            s["ratio"].append(number(e["ratio"]))
            s["error"].append(number(e["error"]))
            s["expected"].append(number(e["expected"]))
        s["findings"] += 1 if row.get("finding") else 0
    print("| stage | rel_l2 (median / max) | worst row error | its expected | largest ratio | findings |")
    print("|---|---|---|---|---|---|")
    for name, s in stages.items():
        worst = max(range(len(s["ratio"])), key=lambda i: s["ratio"][i], default=None)
        row = [f"{statistics.median(s['rel']):.2e} / {max(s['rel']):.2e}"]
        if worst is None:
            row += ["-", "-", "-"]
        else:
            row += [f"{s['error'][worst]:.1e}", f"{s['expected'][worst]:.1e}", f"{s['ratio'][worst]:.2f}"]
        print(f"| {name} | " + " | ".join(row) + f" | {s['findings']} |")
    for note in report.get("notes", []):
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main(sys.argv[1])
