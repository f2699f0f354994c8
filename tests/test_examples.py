"""examples/feed_serve.py plays the example captures into a real serve (the
README's live tour): every primary frame comes back from outdev, and serve
finds the two planted divergences and the missing ping."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def test_feed_serve_plays_the_examples_into_serve(tmp_path):
    sock = {n: str(tmp_path / f"{n}.sock") for n in ("p", "s", "out")}
    ctl = str(tmp_path / "ctl")
    serve = subprocess.Popen([PY, "-m", "colo_cli", "serve", "--primary-in", f"unix:{sock['p']},server",
                              "--secondary-in", f"unix:{sock['s']},server",
                              "--outdev", f"unix:{sock['out']},server", "--control", ctl,
                              "--compare-timeout", "300", "--expired-scan-cycle", "100"],
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(ctl) and time.monotonic() < deadline:
            time.sleep(0.05)
        r = subprocess.run([PY, str(ROOT / "examples" / "feed_serve.py"),
                            str(ROOT / "examples" / "diverge-primary.pcap"),
                            str(ROOT / "examples" / "diverge-secondary.pcap"),
                            "--primary-in", f"unix:{sock['p']}", "--secondary-in", f"unix:{sock['s']}",
                            "--outdev", f"unix:{sock['out']}", "--speed", "4", "--linger", "1.5"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "feed_serve: 15 primary frames sent, 15 released by serve"
        stats = subprocess.run([PY, "-m", "colo_cli", "stats", "--control", ctl, "--json"],
                               capture_output=True, text=True, timeout=30, cwd=ROOT)
        st = json.loads(stats.stdout)["stats"]
        assert st["frames_in"] == {"primary": 15, "secondary": 16}
        assert st["bytes_in"] == {"primary": 5249, "secondary": 5283}     # as replay counts
        assert st["miscompares"] == {"tcp:content": 1, "udp:content": 1}
        assert st["checkpoint_requests"] == {"miscompare": 2, "timeout": 1}
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=15) == 0
    assert "Traceback" not in serve.stderr.read()


@pytest.mark.parametrize("primary, endpoint, message", [
    ("match-primary.pcap", "unix:{tmp}/none,server", "without ',server'"),
    ("match-primary.pcap", "nonsense", "'nonsense': expected tcp:HOST:PORT"),
    ("no-such.pcap", "unix:{tmp}/p", "no-such.pcap: cannot open"),
])
def test_feed_serve_errors_are_one_line(tmp_path, primary, endpoint, message):
    r = subprocess.run([PY, str(ROOT / "examples" / "feed_serve.py"),
                        str(ROOT / "examples" / primary),
                        str(ROOT / "examples" / "match-secondary.pcap"),
                        "--primary-in", endpoint.format(tmp=tmp_path), "--secondary-in", "unix:/x"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr
