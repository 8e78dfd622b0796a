"""tools/scaling_sweep.py: the power-law fitters recover known exponents from synthetic data, and
(slow) a 2 x 2 micro grid runs end to end: runs, CSV, PNG, fits."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np
import pytest

from helpers_launch import ROOT, TINY


def _tool():
    spec = importlib.util.spec_from_file_location("scaling_sweep", os.path.join(ROOT, "tools", "scaling_sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fit_power_law_recovers_exponent():
    sweep = _tool()
    n = np.array([2e4, 6e4, 2e5, 7e5, 3e6])
    loss = 3.2 * (n / 1e4) ** -0.37 + 0.85
    loss = loss * (1 + 1e-4 * np.sin(np.arange(5)))  # a little noise
    fit = sweep.fit_power_law(n, loss)
    assert abs(fit["alpha"] - 0.37) < 0.01 and abs(fit["c"] - 0.85) < 0.01
    assert abs(fit["a"] - 3.2 * 1e4 ** 0.37) / (3.2 * 1e4 ** 0.37) < 0.05
    # negative offsets (continuous bits/dim go below zero) are fine
    fit = sweep.fit_power_law(n, 2.0 * (n / 1e4) ** -0.5 - 1.3)
    assert abs(fit["alpha"] - 0.5) < 1e-3 and abs(fit["c"] + 1.3) < 1e-3
    # two sizes: pure power law (c = 0), exactly determined
    fit = sweep.fit_power_law([1e4, 4e4], [2.0, 2.0 * 4 ** -0.3])
    assert fit["c"] == 0.0 and abs(fit["alpha"] - 0.3) < 1e-4


def test_fit_joint_recovers_both_exponents():
    sweep = _tool()
    n, d = np.meshgrid([2e4, 6e4, 2e5, 7e5], [1e6, 3e6, 1e7])
    n, d = n.ravel(), d.ravel()
    loss = 0.4 + 5.0 * (n / 1e4) ** -0.34 + 8.0 * (d / 1e6) ** -0.28
    fit = sweep.fit_joint(n, d, loss)
    assert abs(fit["alpha"] - 0.34) < 0.01 and abs(fit["beta"] - 0.28) < 0.01
    assert abs(fit["E"] - 0.4) < 0.02
    with pytest.raises(ValueError, match="joint fit needs"):
        sweep.fit_joint(n[:4], d[:4], loss[:4])


def _check_plot(path: str, rows: list[dict]) -> None:
    """Every run is a dot of its budget's colour where the axes put it: x = log10(params) and
    y = loss, linear, each range padded (x by 0.1 decade, y by 10 %) inside the frame
    [80, 570] x [40, 460] of the 760 x 520 figure; the legend shows one swatch per budget."""
    import math

    from PIL import Image

    sweep = _tool()
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (520, 760, 3)
    pts = [r for r in rows if r["loss"] is not None]
    lx0 = math.log10(min(r["params"] for r in pts)) - 0.1
    lx1 = math.log10(max(r["params"] for r in pts)) + 0.1
    y0, y1 = min(r["loss"] for r in pts), max(r["loss"] for r in pts)
    pad = 0.1 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    budgets = sorted({r["steps"] for r in pts})
    for r in pts:
        x = 80 + (math.log10(r["params"]) - lx0) / (lx1 - lx0) * 490
        y = 40 + (y1 - r["loss"]) / (y1 - y0) * 420
        colour = sweep.COLOURS[budgets.index(r["steps"]) % len(sweep.COLOURS)]
        assert tuple(img[round(y), round(x)]) == colour, (r, x, y, tuple(img[round(y), round(x)]))
    for i, steps in enumerate(budgets):  # legend swatches, top to bottom
        assert tuple(img[40 + 13 + 18 * i, 570 + 17]) == sweep.COLOURS[i % len(sweep.COLOURS)]


def _rows():
    return [{"params": p, "loss": 1.0 + 3 * p ** -0.3 + 0.2 * (s == 10), "steps": s}
            for p in (1e4, 3e4, 1e5) for s in (10, 20)]


def test_sizes_and_plot(tmp_path):
    sweep = _tool()
    assert sweep.parse_size("s") == ("s", sweep.SIZES["s"])
    assert sweep.parse_size("32/64/2") == ("s32_d64x2", (32, 64, 2))
    rows = _rows()
    fits = {"steps_10": sweep.fit_power_law([1e4, 3e4, 1e5], [r["loss"] for r in rows if r["steps"] == 10])}
    sweep.plot(rows, fits, str(tmp_path / "p.png"), "bits_per_dim")
    _check_plot(str(tmp_path / "p.png"), rows)


@pytest.mark.parametrize("broken", ["linear x axis", "loss axis upside down", "budgets' colours swapped"])
def test_plot_check_rejects_a_wrong_plot(tmp_path, broken):
    """The plot check fails for a plot whose axis or colours are wrong."""
    sweep = _tool()
    rows = _rows()
    drawn = [dict(r) for r in rows]
    if broken == "linear x axis":  # dots where a linear axis over the same range would put them
        import math

        lo, hi = 1e4, 1e5
        for r in drawn:
            r["params"] = 10 ** (math.log10(lo) + (r["params"] - lo) / (hi - lo) * math.log10(hi / lo))
    elif broken == "loss axis upside down":
        hi, lo = max(r["loss"] for r in rows), min(r["loss"] for r in rows)
        for r in drawn:
            r["loss"] = hi + lo - r["loss"]
    else:
        for r in drawn:
            r["steps"] = 30 - r["steps"]
    sweep.plot(drawn, {}, str(tmp_path / "p.png"), "bits_per_dim")
    with pytest.raises(AssertionError):
        _check_plot(str(tmp_path / "p.png"), rows)


@pytest.mark.slow
def test_micro_grid_2x2_end_to_end(tmp_path, capsys):
    sweep = _tool()
    out = str(tmp_path / "sweep")
    # TINY's data/model settings (tiny clips, one layer each); the sweep sets widths and steps
    extra = [o for o in TINY if not o.startswith(("model.shallow_width", "model.deep_width",
                                                  "train.warmup_steps", "train.log_every"))]
    code = sweep.main(["--out", out, "--sizes", "16/32/1,32/32/1", "--steps", "4,8",
                       "--no-cpu-base", *extra])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"] == 4 and summary["finished"] == 4
    with open(os.path.join(out, "scaling.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(np.isfinite(float(r["loss"])) for r in rows)
    assert len({r["params"] for r in rows}) == 2 and len({r["tokens"] for r in rows}) == 2
    assert summary["fits"]["steps_4"]["points"] == 2  # 2 sizes: a pure power law
    assert summary["fits"]["joint"] is None  # 4 runs < 6: not fitted
    _check_plot(os.path.join(out, "scaling.png"),
                 [{"params": int(r["params"]), "loss": float(r["loss"]), "steps": int(r["steps"])}
                  for r in rows])
    # collecting again runs nothing and gives the same table
    assert sweep.main(["--out", out, "--sizes", "16/32/1,32/32/1", "--steps", "4,8",
                       "--no-cpu-base", "--collect-only", *extra]) == 0
