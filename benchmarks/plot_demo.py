"""Plot `reatt-train --demo` runs side by side from their metrics.jsonl files (the ablation figure).

    python benchmarks/plot_demo.py OUT.png "reader teacher=runs/demo/metrics.jsonl" \
        "uniform teacher=runs/u/metrics.jsonl"

Solid: gold-document top-1 retrieval over the whole corpus; dashed: EM reading the given documents; dotted: the mean
teacher mass on the gold document during training (a diagnostic: the model never sees which document is gold).
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    ev, tr = [], []
    with open(path) as f:
        for r in map(json.loads, f):
            (ev if r["type"] == "eval" else tr).append(r)
    return ev, tr


def main(argv):
    out, runs = argv[0], [a.split("=", 1) for a in argv[1:]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, (label, path) in enumerate(runs):
        ev, tr = load(path)
        c = f"C{k}"
        ax.plot([r["step"] for r in ev], [r.get("retrieval_top1", float("nan")) for r in ev], "-o", ms=3, color=c,
                label=f"{label}: retrieval top-1")
        ax.plot([r["step"] for r in ev], [r["em"] for r in ev], "--", color=c, label=f"{label}: EM")
        w = 50
        steps = [r["step"] for r in tr if "teacher_gold" in r]
        tg = [r["teacher_gold"] for r in tr if "teacher_gold" in r]
        sm = [sum(tg[max(0, i - w + 1) : i + 1]) / len(tg[max(0, i - w + 1) : i + 1]) for i in range(len(tg))]
        ax.plot(steps, sm, ":", color=c, label=f"{label}: teacher mass on gold (train)")
    ax.axhline(1 / 320, color="gray", lw=0.8, label="retrieval chance (1/320)")
    ax.axhline(0.25, color="gray", lw=0.8, ls="--", label="uniform teacher mass (1/4)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    ax.set_title("ReAtt toy demo on CPU, random init: retrieval vs reading", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
