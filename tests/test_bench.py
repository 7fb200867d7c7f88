"""The benchmark end to end on the demo model's small shapes (seconds, not minutes), and its flag errors.

Speed is not checked here (house rule 9): only that every row is measured, and that the two sides,
given the same weights and inputs, compute the same thing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from stablekit.bench import run

PARTS = ("text", "unet", "vae", "txt2img", "lora")
DTYPES = ("fp32", "bf16")
SIDES = ("stablekit", "diffusers")
# fp32, same weights and inputs: the same ops in the same order; the measured difference is 0 (UNet,
# text) or float rounding (VAE, 8e-7). The pictures differ by the sigma interpolation between
# integer timesteps (log-linear vs linear), which 2 steps (t = 999, 0) do not reach.
FP32_TOL = {"text": 1e-4, "unet": 1e-4, "vae": 1e-4, "txt2img": 1e-3, "lora": 1e-3}  # lora: the same LoRA merged


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    cmd = [sys.executable, "-m", "stablekit.bench", "--shapes", "demo", "--size", "64", "--steps", "2",
           "--repeats", "1", "--large-size", "128", "--cache", str(tmp), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_row_is_measured_on_both_sides(bench):
    report, _ = bench
    rows = {(r["part"], r["dtype"]): r for r in report["rows"]}
    expected = [(p, d) for p in PARTS for d in DTYPES] + [("large", "bf16")]
    assert sorted(rows) == sorted(expected)
    for key, row in rows.items():
        assert row["size"] == (128 if key[0] == "large" else 64)
        for side in SIDES:
            r = row[side]
            assert "error" not in r, (key, side, r.get("error"))
            assert r["median_s"] > 0 and all(t > 0 for t in r["times_s"]) and len(r["times_s"]) == 1
            assert r["peak_rss_bytes"] >= r["rss_after_load_bytes"] > 0
            assert r["threads"] == report["settings"]["threads"]
            assert r["output_finite"] and r["ran"]
            assert (r["warmup_s"] is None) == (key[0] == "large")  # large: one timed run, no warm-up
        assert row["speedup"] > 0 and math.isfinite(row["max_abs_diff"])


def test_fp32_outputs_agree_and_bf16_is_close(bench):
    report, _ = bench
    rows = {(r["part"], r["dtype"]): r for r in report["rows"]}
    for part in PARTS:
        assert rows[part, "fp32"]["max_abs_diff"] < FP32_TOL[part], part
        assert rows[part, "bf16"]["max_abs_diff"] < 0.5, part  # bf16 rounds differently on each side
    assert rows["txt2img", "fp32"]["stablekit"]["output_shape"] == [1, 3, 64, 64]
    assert rows["large", "bf16"]["stablekit"]["output_shape"] == [1, 3, 128, 128]
    psnr = report["psnr_bf16_vs_fp32_db"]
    assert set(psnr) == set(SIDES) and all(v is None or v > 20 for v in psnr.values())


def test_table_summary_and_machine_info(bench):
    report, stdout = bench
    assert "speed-up" in stdout and "max |diff|" in stdout
    for part in (*PARTS, "large"):
        assert f"\n{part} " in stdout
    assert "bf16 vs fp32" in stdout and "VAE tiling" in stdout
    assert "LoRA (rank 16, UNet attention) vs plain txt2img, stablekit fp32:" in stdout
    machine = report["machine"]
    assert machine["cpu"] and machine["torch"] and machine["diffusers"] and machine["threads"] >= 1


@pytest.mark.parametrize("flags, message", [
    (["--parts", "unet", "nope"], "invalid choice: 'nope'"),
    (["--size", "100"], "multiple of 8"),
    (["--large-size", "32"], "at least 64"),
    (["--repeats", "0"], "at least 1"),
    (["--dtype", "fp16"], "invalid choice: 'fp16'"),
])
def test_bad_flags_are_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_diffusers_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(run.importlib.util, "find_spec", lambda name: None if name == "diffusers" else real(name))
    with pytest.raises(SystemExit) as e:
        run.main(["--shapes", "demo"])
    assert e.value.code == 2 and "pip install -e .[test]" in capsys.readouterr().err
    assert run.parse_args(["--sides", "stablekit"]).sides == ["stablekit"]  # the stablekit side alone still runs


def test_bad_flag_from_the_command_line_exits_non_zero():
    proc = subprocess.run([sys.executable, "-m", "stablekit.bench", "--parts", "unet", "everything"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
