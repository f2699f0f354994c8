"""benchmarks/bench.py runs end to end on tiny workloads and every frame it
sends comes out exactly once and in order.  No timing is asserted: this only
keeps the benchmark working (its numbers are in benchmarks/README.md)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"
WORKLOADS = ["udp-1000", "udp-1", "tcp-bulk", "udp-100k"]


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(BENCH), "--frames", "2000", "--repeat", "1", "--no-qemu",
                        "--only", "serve,latency,replay,memory", "--verify-replay",
                        "--latency-frames", "500", "--memory-frames", "4000",
                        "--tmpdir", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    assert doc["qemu"] is None          # --no-qemu

    for name in WORKLOADS:
        s = doc["serve"][name]
        assert s["frames"] == doc["params"]["sizes"][name]
        assert s["all_complete"], s
        for run in s["runs"]:
            assert run["complete"] and not run["stalled"], run
            assert run["lossless"] and run["in_order"], run
            assert run["lost"] == run["duplicates"] == run["out_of_order"] == run["corrupt"] == 0, run
            assert run["unique"] == run["expected"] == s["frames"], run
        rp = doc["replay"][name]
        assert rp["match"] and rp["floor_ok"], rp
        v = rp["verify"]
        assert v["lossless"] and v["in_order"] and v["unique"] == rp["frames"], v

    for label in ("serve", "serve_sleeping"):       # (polling before sleeping, and not)
        lat = doc["latency"][label]
        assert lat["lossless"] and lat["in_order"] and not lat["stalled"], lat
        assert lat["measured"] == lat["frames"] == 500
        assert lat["cpu_s"] > 0
    assert "serve --busy-poll-us 0" in r.stdout

    mem = doc["memory"]
    assert all(size["returncode"] == 0 for size in mem["sizes"].values()), mem
    # the table is printed
    assert "serve throughput" in r.stdout and "replay" in r.stdout


def test_counting_cost_smoke():
    """benchmarks/counting_cost.py runs and reports both figures (no timing
    asserted: only that the script works and its comparator released every
    pair, which it asserts itself)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "counting_cost.py"),
                        "--pairs", "3000", "--repeat", "1"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "pairs: 3,000 over 1000 flows, median of 1"
    assert lines[1].startswith("comparator, per pair") and lines[1].endswith(" us")
    assert lines[2].startswith("its counter updates alone") and lines[3].endswith(" %")
