"""``serve`` in production: ``/metrics`` scraped over loopback and read by
prometheus_client's parser, sd_notify against a socket the test listens on,
log lines on a terminal and under journald, ``--config`` (the man page's
example, every option, the command line winning, errors) and the systemd
unit in contrib/.

serve runs as a real process (``python -m colo_cli serve``) as in
test_serve.py; every wait is on a condition with a deadline.
"""

from __future__ import annotations

import configparser
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from colo_cli.testing import udp_frame
from serve_helpers import PY, connect, free_port, rec, unix_ep, wait_until
from test_serve import Rig, env  # noqa: F401 - env is a fixture

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "contrib" / "colo-compare@.service"


# ------------------------------------------------------------------ /metrics

def scrape(port: int, path: str = "/metrics", method: str = "GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def samples_of(text: str) -> tuple[dict, dict]:
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    return families, samples


def test_metrics_endpoint_is_scraped_over_loopback(env):
    port = free_port()
    before = time.time()
    rig = Rig(env, args=["--metrics-listen", f"127.0.0.1:{port}"])
    after = time.time()
    # before any traffic: every family is there, its known label values at zero
    status, headers, text = scrape(port)
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families, samples = samples_of(text)
    for name in ("colo_compare_released", "colo_compare_bypassed", "colo_compare_dropped",
                 "colo_compare_miscompares", "colo_compare_checkpoint_requests",
                 "colo_compare_connections_evicted"):
        assert families[name].type == "counter" and families[name].samples, name
        assert all(s.value == 0 for s in families[name].samples), name
    assert samples[("colo_compare_miscompares_total", (("cause", "content"), ("protocol", "udp")))] == 0
    assert samples[("colo_compare_checkpoint_requests_total", (("cause", "timeout"),))] == 0
    assert samples[("colo_compare_released_total", (("reason", "match"),))] == 0
    # when serve started, as Prometheus conventions have it (not an uptime)
    assert families["colo_compare_start_time_seconds"].type == "gauge"
    assert before - 1 <= samples[("colo_compare_start_time_seconds", ())] <= after
    assert not any(name.startswith("colo_compare_uptime") for name in families)

    # traffic: 5 pairs, one differing
    frames = [udp_frame(b"m%d" % i, sport=7000 + i) for i in range(5)]
    other = frames[:4] + [udp_frame(b"XX", sport=7004)]
    rig.send_pairs([rec(f) for f in frames], [rec(f) for f in other])
    rig.wait_read(5, 5)
    _, _, text = scrape(port)
    families, samples = samples_of(text)
    assert samples[("colo_compare_frames_in_total", (("side", "primary"),))] == 5
    assert samples[("colo_compare_released_total", (("reason", "match"),))] == 4
    assert samples[("colo_compare_miscompares_total", (("cause", "content"), ("protocol", "udp")))] == 1
    assert samples[("colo_compare_checkpoint_requests_total", (("cause", "miscompare"),))] == 1
    assert samples[("colo_compare_link_connected", (("link", "outdev"),))] == 1
    assert families["colo_compare_hold_seconds"].type == "histogram"
    # the same document the control socket gives, in the same format
    st = rig.srv.stats()
    assert samples[("colo_compare_released_total", (("reason", "match"),))] == st["released"]["match"]
    # one format implementation: what stats --format prometheus prints, but for the clock
    out = subprocess.run([PY, "-m", "colo_cli", "stats", "--control", rig.srv.control_path,
                          "--format", "prometheus"], capture_output=True, text=True, timeout=30)
    strip = lambda t: [l for l in t.splitlines() if "uptime" not in l and "connections" not in l
                       and "outdev" not in l and "queued" not in l]
    assert strip(out.stdout) == strip(text)
    assert rig.stop() == 0


def test_metrics_endpoint_http_edges(env):
    port = free_port()
    Rig(env, args=["--metrics-listen", f"127.0.0.1:{port}"])
    assert scrape(port, "/nope")[0] == 404
    assert scrape(port, "/metrics", method="POST")[0] == 405
    status, headers, body = scrape(port, "/metrics", method="HEAD")
    assert status == 200 and body == "" and int(headers["Content-Length"]) > 1000
    assert scrape(port, "/metrics?x=1")[0] == 200
    assert scrape(port, "/")[0] == 200
    # a client that sends nothing, and one that sends too much, cost nothing else
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    big = socket.create_connection(("127.0.0.1", port), timeout=10)
    big.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n")
    assert big.recv(100).startswith(b"HTTP/1.1 431 ")
    assert scrape(port)[0] == 200
    garbage = socket.create_connection(("127.0.0.1", port), timeout=10)
    garbage.sendall(b"\x16\x03\x01 hello\r\n\r\n")
    assert garbage.recv(100).startswith(b"HTTP/1.1 400 ")
    for s in (idle, big, garbage):
        s.close()


def test_metrics_listen_errors_are_one_line(env):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    p, _ = unix_ep(env.workdir, "p.sock")
    s, _ = unix_ep(env.workdir, "s.sock")
    o, _ = unix_ep(env.workdir, "o.sock")
    for value, needle in ((f"127.0.0.1:{port}", f"--metrics-listen 127.0.0.1:{port}: cannot listen: "),
                          ("nope", "'nope' is not HOST:PORT"),
                          ("::1:80", "an IPv6 address goes in brackets"),
                          ("127.0.0.1:99999", "the port must be a number from 0 to 65535")):
        r = subprocess.run([PY, "-m", "colo_cli", "serve", "--primary-in", p, "--secondary-in", s,
                            "--outdev", o, "--metrics-listen", value],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, r
        assert len(r.stderr.splitlines()) == 1 and needle in r.stderr, r.stderr
    busy.close()


# ------------------------------------------------------------------ sd_notify

class NotifySocket:
    """What systemd listens on: a unix datagram socket (``abstract``: in
    the abstract namespace, as NOTIFY_SOCKET=@name says)."""

    def __init__(self, directory: str, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = "colo-test-%d-%d" % (os.getpid(), time.monotonic_ns())
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = os.path.join(directory, "notify.sock")
            self.sock.bind(path)
            self.env_value = path
        self.messages: list[tuple[float, bytes]] = []

    def wait(self, pred, timeout: float = 20.0, what: str = "a notification") -> list[bytes]:
        deadline = time.monotonic() + timeout
        while not pred([m for _, m in self.messages]):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {self.messages}")
            r, _, _ = select.select([self.sock], [], [], min(left, 0.2))
            if r:
                self.messages.append((time.monotonic(), self.sock.recv(4096)))
        return [m for _, m in self.messages]

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_ready_watchdog_stopping(env, monkeypatch, abstract):
    ns = env.track(NotifySocket(env.workdir, abstract))
    monkeypatch.setenv("NOTIFY_SOCKET", ns.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")          # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    p_ep, _ = unix_ep(env.workdir, "p.sock")
    s_ep, _ = unix_ep(env.workdir, "s.sock")
    o_ep, _ = unix_ep(env.workdir, "o.sock")
    srv = env.start(["--primary-in", p_ep, "--secondary-in", s_ep, "--outdev", o_ep],
                    control=False, ready=False, verbose=False)
    msgs = ns.wait(lambda m: any(x.startswith(b"READY=1") for x in m), what="READY=1")
    ready = next(x for x in msgs if x.startswith(b"READY=1"))
    # one datagram: READY and a status line for systemctl status
    assert ready.split(b"\n") == [b"READY=1", b"STATUS=comparing: primary-in %s, secondary-in %s, "
                                  b"outdev %s" % (p_ep.encode(), s_ep.encode(), o_ep.encode())]
    # ready means listening: the endpoints take connections now
    for ep in (p_ep, s_ep, o_ep):
        connect(ep).close()
    # the watchdog is fed while the loop runs
    ns.wait(lambda m: m.count(b"WATCHDOG=1") >= 3, what="three WATCHDOG=1")
    srv.signal(signal.SIGTERM)
    ns.wait(lambda m: any(x.startswith(b"STOPPING=1") for x in m), what="STOPPING=1")
    assert srv.wait(20) == 0
    msgs = [m for _, m in ns.messages]
    assert msgs.index(ready) < msgs.index(next(x for x in msgs if x.startswith(b"STOPPING=1")))


def test_sd_notify_watchdog_meant_for_another_process_is_not_fed(env, monkeypatch):
    ns = env.track(NotifySocket(env.workdir))
    monkeypatch.setenv("NOTIFY_SOCKET", ns.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", "1")               # not serve's pid
    p_ep, _ = unix_ep(env.workdir, "p.sock")
    s_ep, _ = unix_ep(env.workdir, "s.sock")
    o_ep, _ = unix_ep(env.workdir, "o.sock")
    srv = env.start(["--primary-in", p_ep, "--secondary-in", s_ep, "--outdev", o_ep],
                    control=True, ready=True, verbose=True)
    ns.wait(lambda m: any(x.startswith(b"READY=1") for x in m), what="READY=1")
    # a second of pings there would be, were they meant for serve
    srv.stats()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        r, _, _ = select.select([ns.sock], [], [], 0.1)
        if r:
            ns.messages.append((time.monotonic(), ns.sock.recv(4096)))
    assert b"WATCHDOG=1" not in [m for _, m in ns.messages]
    srv.signal(signal.SIGTERM)
    assert srv.wait(20) == 0


def test_notifier_without_notify_socket_sends_nothing():
    from colo_cli.systemd import Notifier
    n = Notifier({})
    assert not n.enabled and n.notify("READY=1") is False and n.watchdog_interval_s is None
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "3000000"}).watchdog_interval_s == 1.5
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}).watchdog_interval_s is None
    # a notify socket that went away is not serve's problem
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"}).notify("READY=1") is False


# ------------------------------------------------------------------ log lines

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} colo-compare: ")


def _serve_on_a_terminal(env, extra_env):
    """serve -v with its stderr on a pseudo-terminal; its first log lines."""
    master, slave = pty.openpty()
    p_ep, _ = unix_ep(env.workdir, "p.sock")
    s_ep, _ = unix_ep(env.workdir, "s.sock")
    o_ep, _ = unix_ep(env.workdir, "o.sock")
    environ = dict(os.environ, **extra_env(slave))
    environ["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([PY, "-m", "colo_cli", "serve", "--primary-in", p_ep, "--secondary-in",
                             s_ep, "--outdev", o_ep, "-v"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave, env=environ, cwd=env.workdir)
    os.close(slave)
    buf = b""
    try:
        def serving():
            nonlocal buf
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                buf += os.read(master, 4096)
            return b"serving:" in buf
        wait_until(serving, 20, "serve's first log line on the terminal")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        os.close(master)
    return buf.decode().replace("\r\n", "\n").splitlines()


def test_log_lines_carry_the_time_on_a_terminal(env):
    lines = _serve_on_a_terminal(env, lambda slave: {})
    line = next(l for l in lines if "serving:" in l)
    assert STAMP.match(line), line


def test_log_lines_carry_no_time_under_journald(env):
    def journal(slave):
        st = os.fstat(slave)
        return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    lines = _serve_on_a_terminal(env, journal)
    line = next(l for l in lines if "serving:" in l)
    assert line.startswith("colo-compare: serving: "), line


def test_log_lines_in_a_file_are_unchanged(env):
    rig = Rig(env)
    assert rig.srv.stderr_lines()[0].startswith("colo-compare: serving: ")


# ------------------------------------------------------------------ --config

def man_page_config_example() -> str:
    """The TOML example of colo-compare-serve(1), roff escapes undone."""
    text = (ROOT / "man" / "colo-compare-serve.1").read_text()
    section = text.split(".SH CONFIGURATION FILE", 1)[1].split(".SH ", 1)[0]
    block = section.split(".nf\n", 1)[1].split(".fi\n", 1)[0]
    return block.replace("\\-", "-").replace("\\e", "\\")


def options_from(argv, monkeypatch):
    """The ServeOptions 'colo-compare serve ARGV' would run with (serve
    itself is not started), or the SystemExit code and stderr."""
    import colo_cli.serve
    from colo_cli.cli import main
    got = {}

    def fake(options, stderr=None):
        got["options"] = options
        return 0
    monkeypatch.setattr(colo_cli.serve, "run", fake)
    try:
        main(["serve", *map(str, argv)])
    except SystemExit as e:
        if e.code != 0:
            return e.code
    return got["options"]


def test_the_command_line_defaults_are_the_options_objects(monkeypatch):
    """serve's options left out are ServeOptions' (and Config's) own
    defaults: they are stated once."""
    from colo_cli.options import ServeOptions
    o = options_from(["--primary-in", "tcp:127.0.0.1:9001", "--secondary-in",
                      "tcp:127.0.0.1:9004,server", "--outdev", "tcp:127.0.0.1:9005"], monkeypatch)
    assert o == ServeOptions(o.primary_in, o.secondary_in, o.outdev)


def test_the_man_page_example_config_loads(tmp_path, monkeypatch):
    path = tmp_path / "hn0.toml"
    path.write_text(man_page_config_example())
    o = options_from(["--config", path], monkeypatch)
    assert str(o.primary_in) == "tcp:127.0.0.1:9001"
    assert str(o.secondary_in) == "tcp:0.0.0.0:9004,server"
    assert str(o.outdev) == "tcp:127.0.0.1:9005"
    assert o.config.compare_timeout_ms == 3000 and o.config.max_queue_size == 1024
    assert [r.text for r in o.config.ignore] == ["dns.id", "http.date"]
    assert o.control_path == "/run/colo-compare/hn0/ctl"
    assert o.events_path == "/var/log/colo-compare/hn0.jsonl"
    assert o.metrics_listen == ("127.0.0.1", 9464)
    assert o.drain_timeout_s == 5.0 and o.verbose == 1
    # and the README's (a subset) too
    readme = (ROOT / "README.md").read_text()
    block = readme.split("# /etc/colo-compare/hn0.toml\n", 1)[1].split("```", 1)[0]
    path.write_text(block)
    o = options_from(["--config", path], monkeypatch)
    assert o.metrics_listen == ("127.0.0.1", 9464) and str(o.outdev) == "tcp:127.0.0.1:9005"


#: a value for every option of serve: (config value, command-line words).
#: A new option of serve fails test_every_option_can_come_from_the_config
#: until it has a line here.
SAMPLES = {
    "primary-in": ("unix:/tmp/cc-p.sock,server", None),
    "secondary-in": ("tcp:127.0.0.1:19004,server", None),
    "outdev": ("tcp:127.0.0.1:19005", None),
    "notify-dev": ("tcp:127.0.0.1:19009,server", None),
    "compare-timeout": (1234, None),
    "expired-scan-cycle": (250, None),
    "max-queue-size": (77, None),
    "max-connections": (999, None),
    "max-queued-mib": (33, None),
    "vnet-hdr-support": (True, None),
    "normalize-seq": (True, None),
    "ignore": (["dns.id", "udp:9:0-4"], None),
    "checkpoint-policy": ("hold", None),
    "control": ("/tmp/cc-ctl", None),
    "events": ("/tmp/cc-events.jsonl", None),
    "hexdump": ("3", None),
    "hexdump-rate": (3, None),
    "outdev-buffer": (17, None),
    "connect-timeout": (2.5, None),
    "drain-timeout": (1.5, None),
    "busy-poll-us": (20, None),
    "metrics-listen": ("[::1]:9464", None),
    "verbose": (True, None),
    "quiet": (False, None),
    "qmp": ("unix:/tmp/cc-qmp.sock", None),
    "qmp-checkpoint-timeout": (4000, None),
    "color": ("never", None),
    "debug": (True, None),
}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


def _argv(key, value) -> list:
    if isinstance(value, bool):
        return [f"--{key}"] if value else []
    if isinstance(value, list):
        return [w for v in value for w in (f"--{key}", v)]
    return [f"--{key}", value]


def test_every_option_can_come_from_the_config(tmp_path, monkeypatch):
    """Each option, given in the file, gives what it gives on the command line."""
    from colo_cli.cli import cli
    from colo_cli.config import _options_by_key
    keys = set(_options_by_key(cli.commands["serve"]))
    assert keys == set(SAMPLES), f"options without a sample here: {keys ^ set(SAMPLES)}"
    base = ["--primary-in", "unix:/tmp/b-p.sock,server", "--secondary-in", "unix:/tmp/b-s.sock,server",
            "--outdev", "unix:/tmp/b-o.sock,server"]
    for key, (value, _) in SAMPLES.items():
        path = tmp_path / f"{key}.toml"
        path.write_text(f"{key} = {_toml(value)}\n")
        with_base = [w for i, w in enumerate(base) if not (w == f"--{key}" or (i and base[i - 1] == f"--{key}"))]
        from_file = options_from(["--config", path, *with_base], monkeypatch)
        from_line = options_from([*with_base, *_argv(key, value)], monkeypatch)
        assert from_file == from_line, key


def test_busy_poll_reaches_the_options_and_zero_turns_it_off(monkeypatch):
    base = ["--primary-in", "unix:/tmp/b-p.sock,server", "--secondary-in",
            "unix:/tmp/b-s.sock,server", "--outdev", "unix:/tmp/b-o.sock,server"]
    assert options_from(base, monkeypatch).busy_poll_us == 50
    assert options_from([*base, "--busy-poll-us", "0"], monkeypatch).busy_poll_us == 0
    assert options_from([*base, "--busy-poll-us", "200"], monkeypatch).busy_poll_us == 200


def test_the_command_line_wins_over_the_config(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text(man_page_config_example())
    o = options_from(["--config", path, "--compare-timeout", "700", "--outdev", "unix:/tmp/x.sock",
                      "--ignore", "udp.checksum", "--metrics-listen", ":9999"], monkeypatch)
    assert o.config.compare_timeout_ms == 700
    assert str(o.outdev) == "unix:/tmp/x.sock"
    assert [r.text for r in o.config.ignore] == ["udp.checksum"]
    assert o.metrics_listen == ("", 9999)
    assert str(o.primary_in) == "tcp:127.0.0.1:9001"       # still from the file
    # the file may come after the options it sets: it is read first all the same
    o = options_from(["--compare-timeout", "800", "--config", path], monkeypatch)
    assert o.config.compare_timeout_ms == 800


@pytest.mark.parametrize("content,message", [
    ("bogus = 1", "unknown option 'bogus'"),
    ("primary-in = 5", "primary-in: expected a string, not a number"),
    ("compare-timeout = true", "compare-timeout: expected a number, not a boolean"),
    ("compare-timeout = 0", "compare-timeout: Invalid value for '--compare-timeout'"),
    ("verbose = \"yes\"", "verbose: expected true or false"),
    ("ignore = [\"nonsense\"]", "ignore: Invalid value for '--ignore': 'nonsense': unknown rule"),
    ("ignore = 3", "ignore: expected a list of strings"),
    ("outdev = [\"a\"]", "outdev: expected one value, not a list"),
    ("[serve]\nprimary-in = \"x\"", "[serve]: tables are not used"),
    ("x = ", "not valid TOML: Invalid value (at line 1, column 5)"),
    ("primary-in = \"udp:1.2.3.4:5\"", "primary-in: Invalid value for '--primary-in'"),
])
def test_config_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content + "\n")
    r = subprocess.run([PY, "-m", "colo_cli", "serve", "--config", str(path)],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and r.stdout == "", r
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"colo-compare serve: {path}: ") and message in line, line
    r = subprocess.run([PY, "-m", "colo_cli", "serve", "--config", str(tmp_path / "missing.toml")],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and "missing.toml: cannot read: no such file or directory" in r.stderr


def test_underscored_keys_as_qemu_spells_them(tmp_path, monkeypatch):
    path = tmp_path / "q.toml"
    path.write_text('primary_in = "tcp:127.0.0.1:9001"\nsecondary_in = "tcp:0.0.0.0:9004,server"\n'
                    'outdev = "tcp:127.0.0.1:9005"\ncompare_timeout = 4000\nmax_queue_size = 9\n')
    o = options_from(["--config", path], monkeypatch)
    assert o.config.compare_timeout_ms == 4000 and o.config.max_queue_size == 9


# ------------------------------------------------------------------ the systemd unit

def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=True, interpolation=None)
    cp.optionxform = str
    cp.read_string(UNIT.read_text())
    return cp


def test_the_unit_is_one_notify_service_per_nic_with_its_config():
    u = unit()
    service = u["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].split()[1:] == ["serve", "--config", "/etc/colo-compare/%i.toml"]
    assert int(service["WatchdogSec"]) > 0
    assert service["KillSignal"] == "SIGTERM"
    assert "%i" in u["Unit"]["Description"]
    assert u["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    """systemd's own checker, on an instance, with ExecStart pointing at this
    Python (the unit's /usr/local/bin may not exist here)."""
    text = UNIT.read_text().replace("/usr/local/bin/colo-compare", f"{PY} -m colo_cli")
    (tmp_path / "colo-compare@.service").write_text(text)
    (tmp_path / "colo-compare@hn0.service").symlink_to("colo-compare@.service")
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", "colo-compare@hn0.service"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Unknown key" not in r.stderr and "Unknown section" not in r.stderr, r.stderr


def test_serve_as_the_unit_runs_it(env, tmp_path):
    """The unit's ExecStart, as systemd would start it: NOTIFY_SOCKET,
    WATCHDOG_USEC from WatchdogSec (shortened), JOURNAL_STREAM naming
    stderr, %i the NIC; READY, pings, log lines without times, then
    SIGTERM: STOPPING and exit 0."""
    ns = env.track(NotifySocket(env.workdir))
    config = Path(env.workdir) / "hn0.toml"
    config.write_text(f'primary-in = "unix:{env.workdir}/p.sock,server"\n'
                      f'secondary-in = "unix:{env.workdir}/s.sock,server"\n'
                      f'outdev = "unix:{env.workdir}/o.sock,server"\n'
                      f'control = "{env.workdir}/ctl"\nverbose = true\n')
    words = unit()["Service"]["ExecStart"].replace("%i", "hn0").split()[1:]
    words = [str(config) if w == "/etc/colo-compare/hn0.toml" else w for w in words]
    err_path = Path(env.workdir) / "journal.txt"
    with open(err_path, "wb") as err:
        st = os.fstat(err.fileno())
        environ = dict(os.environ, NOTIFY_SOCKET=ns.env_value, WATCHDOG_USEC="200000",
                       JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([PY, "-m", "colo_cli", *words], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, env=environ, cwd=env.workdir)
    try:
        ns.wait(lambda m: any(x.startswith(b"READY=1") for x in m) and m.count(b"WATCHDOG=1") >= 2,
                what="READY=1 and the watchdog")
        proc.send_signal(signal.SIGTERM)
        ns.wait(lambda m: any(x.startswith(b"STOPPING=1") for x in m), what="STOPPING=1")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = err_path.read_text().splitlines()
    assert lines and all(l.startswith("colo-compare: ") for l in lines), lines


@pytest.mark.parametrize("written,given", [("true", []), ("5", ["5"]), ('"all"', ["all"])])
def test_an_option_whose_value_may_be_left_out_takes_true_or_a_number(tmp_path, monkeypatch,
                                                                       written, given):
    """``hexdump = true`` is --hexdump alone, ``hexdump = 5`` is --hexdump 5."""
    base = ["--primary-in", "unix:/tmp/h-p.sock,server", "--secondary-in",
            "unix:/tmp/h-s.sock,server", "--outdev", "unix:/tmp/h-o.sock,server"]
    path = tmp_path / "h.toml"
    path.write_text(f"hexdump = {written}\n")
    assert (options_from(["--config", path, *base], monkeypatch)
            == options_from([*base, "--hexdump", *given], monkeypatch))
