"""Frequency response of ES's weight filter (docs/spec.md section 3).

Over a sample's visits n, w_n = s_n + lam d_n is a linear filter of its loss
sequence l_n (w_min aside):

    H(z) = (1-b1)/(1-b1 z^-1) + lam (1-b2)(1-z^-1) / ((1-b1 z^-1)(1-b2 z^-1))

This script plots |H(e^{iw})| for w in [0, pi] (radians per visit: w = 0 is a
constant loss level, w = pi a loss alternating between visits) for a few
settings, checks the closed form against the recurrences, and writes
bench/results/filter_response.png.

    python bench/filter_response.py [--out PATH]
"""

from __future__ import annotations

import argparse
import cmath
import math
from pathlib import Path

SETTINGS = [  # (beta1, beta2, lam, what it does)
    (0.2, 0.5, 1.0, "defaults: level + trend"),
    (0.8, 0.5, 0.0, "lam=0, slow level (w = s)"),
    (0.2, 0.5, 0.0, "lam=0, fast level"),
    (0.5, 0.9, 1.0, "smooth trend"),
    (0.2, 0.0, 2.0, "strong, raw trend"),
    (0.0, 0.0, 1.0, "w = 2 l - l_prev"),
]


def response(b1: float, b2: float, lam: float, w: float) -> complex:
    zi = cmath.exp(-1j * w)  # z^-1
    return (1 - b1) / (1 - b1 * zi) + lam * (1 - b2) * (1 - zi) / ((1 - b1 * zi) * (1 - b2 * zi))


def simulate(b1: float, b2: float, lam: float, w: float, n: int = 4000) -> float:
    """|H| from the section-3 recurrences driven by cos(w n) (after the transient)."""
    s, d, out = None, 0.0, []
    for k in range(n):
        l = math.cos(w * k)
        if s is None:
            s, d = l, 0.0
        else:
            s, d = b1 * s + (1 - b1) * l, b2 * d + (1 - b2) * (l - s)
        out.append(s + lam * d)
    return max(abs(x) for x in out[n // 2 :])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "filter_response.png"))
    a = ap.parse_args(argv)
    for b1, b2, lam, _ in SETTINGS:  # the closed form is the recurrences' gain
        for w in (0.0, 0.5, 1.5, math.pi):
            assert abs(abs(response(b1, b2, lam, w)) - simulate(b1, b2, lam, w)) < 1e-3, (b1, b2, lam, w)
        assert abs(response(b1, b2, lam, 0.0) - 1) < 1e-12  # DC gain 1
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [math.pi * i / 400 for i in range(401)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for b1, b2, lam, what in SETTINGS:
        ax.plot(
            ws,
            [abs(response(b1, b2, lam, w)) for w in ws],
            label=(
                f"beta1={b1:g} beta2={b2:g} lam={lam:g}: {what} (|H(-1)| = {abs(response(b1, b2, lam, math.pi)):.2f})"
            ),
        )
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlim(0, math.pi)
    ax.set_xticks([0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi], ["0", "π/4", "π/2", "3π/4", "π"])
    ax.set_xlabel("ω (radians per visit): 0 = constant loss level, π = loss alternating between visits")
    ax.set_ylabel("|H(e^{iω})|: gain from loss to weight")
    ax.set_title("ES weight filter w = s + lam·d (docs/spec.md §3)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    for b1, b2, lam, what in SETTINGS:
        print(
            f"beta1={b1:g} beta2={b2:g} lam={lam:g} ({what}): |H| at w = pi/4, pi/2, pi: "
            + ", ".join(f"{abs(response(b1, b2, lam, w)):.3f}" for w in (math.pi / 4, math.pi / 2, math.pi))
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
