#!/usr/bin/env python3
"""Capture two real replicas of the same services, for ``replay --normalize-seq``.

Run as root (Linux, ``ip``, ``tcpdump``, ``ethtool``, ``ping`` and
``redis-server`` installed; on Debian ``apt-get install iproute2 tcpdump
ethtool iputils-ping redis-server``)::

    python3 tests/replicas/make_replicas.py            # writes into tests/replicas/
    python3 tests/replicas/make_replicas.py --out DIR  # writes into DIR

Each replica is a pair of network namespaces joined by a veth pair, and the
two replicas are identical in addressing:

* ``colorep-<r>-srv``: the replica ("server"), 10.77.0.2/24, MAC
  52:54:00:12:34:56, running an HTTP server (the stdlib's ``http.server``
  serving a fixed directory), a DNS responder (below), ``redis-server`` bound
  to 10.77.0.2:6379, and answering ping;
* ``colorep-<r>-cli``: the client, 10.77.0.1/24, MAC 52:54:00:12:34:01,
  running the same scripted workload on each replica, from FIXED source ports
  (as a COLO client would: both replicas see the same client connections).

tcpdump captures the server side of the veth (both directions) for the whole
workload.  Replica ``a`` keeps the veth's default offloads (TSO/GSO on: the
capture holds GSO frames of up to 64 KB), replica ``b`` has
``ethtool -K veth0 tso off gso off`` (MSS-sized segments), so the two differ
in segmentation.  Their TCP ISNs, TCP timestamps and IP IDs differ naturally
(each run is a new connection on another kernel network namespace, later in
time).

Two pairs are captured, each from fresh namespaces:

* ``equal-a.pcap`` / ``equal-b.pcap``: both replicas serve identical files;
* ``diverge-a.pcap`` / ``diverge-b.pcap``: replica b's ``big.txt`` differs by
  exactly one byte (``PLANT_OFFSET``).

The captures are then read back (a small stdlib pcap reader below), every TCP
stream is reassembled and compared, and ``expected.json`` records per pair
the flows, the ISNs, what differs and where, and for the diverge pair the
stream offset of the planted byte (counted from the first byte after the
server's SYN-ACK, i.e. ISN + 1).  The script fails if the equal pair's TCP
streams are not byte-identical or the diverge pair differs anywhere else
than the planted byte.

The HTTP server is ``python3 -m http.server`` with one change: its ``Date:``
header is pinned (``FIXED_DATE``), so that the two replicas' HTTP bytes are
equal even when the runs straddle a second; ``--natural-date`` runs the
plain ``python3 -m http.server`` instead.  File mtimes are pinned too
(``Last-Modified``).

Everything created (namespaces, veths, processes, temporary files) is
removed at the end, also on failure; leftovers of an interrupted run are
removed at the start, so the script can be re-run.  Re-running it writes new
captures (new ISNs, timings): they are not byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.abspath(__file__)

NS_PREFIX = "colorep-"
SERVER_IP, CLIENT_IP = "10.77.0.2", "10.77.0.1"
SERVER_MAC, CLIENT_MAC = "52:54:00:12:34:56", "52:54:00:12:34:01"
IFNAME = "veth0"
HTTP_PORT, DNS_PORT, REDIS_PORT = 80, 53, 6379

FIXED_DATE = "Mon, 01 Jun 2026 12:00:00 GMT"
FILE_MTIME = 1767225600            # 2026-01-01 00:00:00 UTC, for Last-Modified
BIG_FILE, BIG_SIZE = "big.txt", 150_000
PLANT_FILE, PLANT_OFFSET = BIG_FILE, 100_003

#: per-replica link settings (server side of the veth)
REPLICAS = {
    "a": {"mtu": 1500, "ethtool": []},
    "b": {"mtu": 1500, "ethtool": ["tso", "off", "gso", "off"]},
}

# --- the client workload: fixed source ports, fixed bytes -----------------

PING_ID, PING_COUNT = 4660, 5        # ping -e 4660 (0x1234) -c 5

DNS_CLIENT_PORT = 53001
#: (transaction id or None for a random one, name, qtype)
DNS_QUERIES = [
    (0x1001, "www.example.test", 1),
    (0x1002, "db.example.test", 1),
    (0x1003, "mirror.example.test", 1),
    (0x1004, "nothere.example.test", 1),     # NXDOMAIN
    (0x1005, "www.example.test", 28),        # AAAA: NOERROR, no answer
    (None, "www.example.test", 1),           # random ID: natural noise
]

#: (client port, method, path)
HTTP_REQUESTS = [
    (41001, "GET", "/"),
    (41002, "GET", "/small.txt"),
    (41003, "HEAD", "/" + BIG_FILE),
    (41004, "GET", "/" + BIG_FILE),
    (41005, "GET", "/page.html"),
    (41006, "GET", "/missing.html"),         # 404
]

REDIS_CLIENT_PORT = 46379
REDIS_BLOB = "".join(f"{i:04d}-blob;" for i in range(300))   # 3000 bytes
REDIS_COMMANDS = [
    ["PING"],
    ["SET", "greeting", "hello replica"],
    ["GET", "greeting"],
    ["SET", "blob", REDIS_BLOB],
    ["GET", "blob"],
    ["INCR", "counter"],
    ["INCR", "counter"],
    ["GET", "missing"],
    ["DEL", "greeting"],
    ["EXISTS", "greeting"],
    ["QUIT"],
]

# --- the DNS responder's zone (deterministic answers) ----------------------

DNS_ZONE = {
    "www.example.test": {1: ["10.77.0.2"]},
    "db.example.test": {1: ["10.77.0.2"]},
    "mirror.example.test": {1: ["192.0.2.10", "192.0.2.11"]},
}
DNS_TTL = 300


# ===========================================================================
# the served files
# ===========================================================================

def served_files() -> dict:
    lines = []
    n = 0
    while sum(map(len, lines)) < BIG_SIZE:
        lines.append(f"{n:06d} the quick brown fox jumps over the lazy replica dog\n")
        n += 1
    big = "".join(lines).encode()[:BIG_SIZE]
    page = ("<!DOCTYPE html>\n<html><head><title>replica page</title></head><body>\n"
            + "".join(f"<p>paragraph {i}: colo-compare replica test page.</p>\n" for i in range(120))
            + "</body></html>\n").encode()
    return {
        "index.html": (b"<!DOCTYPE html>\n<html><head><title>replica</title></head>"
                       b"<body><h1>colo replica</h1><ul><li><a href=\"small.txt\">small</a></li>"
                       b"<li><a href=\"page.html\">page</a></li><li><a href=\"big.txt\">big</a></li>"
                       b"</ul></body></html>\n"),
        "small.txt": b"hello from the replica\n" * 4,
        "page.html": page,
        BIG_FILE: big,
    }


def planted_byte(old: int) -> int:
    return ord("#") if old != ord("#") else ord("$")


def write_www(directory: str, plant: bool) -> dict:
    os.makedirs(directory, exist_ok=True)
    files = served_files()
    info = {}
    for name, data in files.items():
        if plant and name == PLANT_FILE:
            data = bytearray(data)
            old = data[PLANT_OFFSET]
            data[PLANT_OFFSET] = planted_byte(old)
            data = bytes(data)
            info = {"file": name, "file_offset": PLANT_OFFSET, "byte_a": old,
                    "byte_b": data[PLANT_OFFSET]}
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, (FILE_MTIME, FILE_MTIME))
    os.utime(directory, (FILE_MTIME, FILE_MTIME))
    return info


# ===========================================================================
# servers and client (run inside the namespaces as subcommands of this file)
# ===========================================================================

def serve_http(directory: str) -> None:
    import http.server

    class Handler(http.server.SimpleHTTPRequestHandler):
        def date_time_string(self, timestamp=None):
            if timestamp is None:
                return FIXED_DATE
            return super().date_time_string(timestamp)

    handler = functools.partial(Handler, directory=directory)
    http.server.ThreadingHTTPServer.allow_reuse_address = True
    with http.server.ThreadingHTTPServer((SERVER_IP, HTTP_PORT), handler) as httpd:
        httpd.serve_forever()


def dns_answer(query: bytes):
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!3H", query[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    i, labels = 12, []
    while True:
        if i >= len(query):
            return None
        n = query[i]
        i += 1
        if n == 0:
            break
        if n & 0xC0:
            return None
        labels.append(query[i:i + n].decode("ascii", "replace").lower())
        i += n
    if i + 4 > len(query):
        return None
    qtype, qclass = struct.unpack("!HH", query[i:i + 4])
    question = query[12:i + 4]
    name = ".".join(labels)
    if name in DNS_ZONE:
        rcode = 0
        addrs = DNS_ZONE[name].get(qtype, []) if qclass == 1 else []
    else:
        rcode, addrs = 3, []
    flags_out = 0x8400 | (flags & 0x0100) | rcode          # QR, AA, RD copied
    answers = b"".join(struct.pack("!HHHIH", 0xC00C, 1, 1, DNS_TTL, 4) + socket.inet_aton(a)
                       for a in addrs)
    return struct.pack("!6H", qid, flags_out, 1, len(addrs), 0, 0) + question + answers


def serve_dns() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((SERVER_IP, DNS_PORT))
    while True:
        data, peer = s.recvfrom(4096)
        reply = dns_answer(data)
        if reply is not None:
            s.sendto(reply, peer)


def dns_query(qid: int, name: str, qtype: int) -> bytes:
    q = struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", qtype, 1)


def tcp_connect(port: int, dport: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((CLIENT_IP, port))
    s.settimeout(10)
    s.connect((SERVER_IP, dport))
    return s


def resp_encode(args) -> bytes:
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        a = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


class RespReader:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b"-", b":"):
            return line.decode()
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self._exact(n).decode()
            return f"<{n} bytes>" if n > 40 else data
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise ValueError(f"bad RESP line {line!r}")


def run_client() -> None:
    summary = {}
    pause = functools.partial(time.sleep, 0.1)

    # ping
    r = subprocess.run(["ping", "-n", "-c", str(PING_COUNT), "-i", "0.2", "-e", str(PING_ID),
                        SERVER_IP], capture_output=True, text=True)
    summary["ping"] = r.stdout.strip().splitlines()[-2:] if r.stdout else r.stderr.strip()
    pause()

    # DNS
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((CLIENT_IP, DNS_CLIENT_PORT))
    s.settimeout(5)
    fixed = {q[0] for q in DNS_QUERIES if q[0] is not None}
    answers = []
    for qid, name, qtype in DNS_QUERIES:
        if qid is None:
            qid = random.SystemRandom().choice([i for i in range(0x10000) if i not in fixed])
        s.sendto(dns_query(qid, name, qtype), (SERVER_IP, DNS_PORT))
        data, _ = s.recvfrom(4096)
        an = struct.unpack("!H", data[6:8])[0]
        answers.append({"id": f"0x{qid:04x}", "name": name, "qtype": qtype,
                        "rcode": data[3] & 0xF, "answers": an})
        pause()
    s.close()
    summary["dns"] = answers

    # HTTP
    http = []
    for port, method, path in HTTP_REQUESTS:
        sock = tcp_connect(port, HTTP_PORT)
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {SERVER_IP}\r\n"
                     f"User-Agent: colo-replica-client/1\r\nAccept: */*\r\n"
                     f"Connection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        http.append({"port": port, "request": f"{method} {path}",
                     "status": head.split(b"\r\n", 1)[0].decode(),
                     "header_bytes": len(head) + 4, "body_bytes": len(body)})
        pause()
    summary["http"] = http

    # redis
    sock = tcp_connect(REDIS_CLIENT_PORT, REDIS_PORT)
    reader = RespReader(sock)
    replies = []
    for cmd in REDIS_COMMANDS:
        sock.sendall(resp_encode(cmd))
        replies.append([cmd[0], reader.reply()])
        pause()
    sock.close()
    summary["redis"] = replies
    print(json.dumps(summary))


# ===========================================================================
# orchestration
# ===========================================================================

def run(cmd, *, ns=None, check=True):
    if ns:
        cmd = ["ip", "netns", "exec", ns] + list(cmd)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def ns_names(replica: str):
    return f"{NS_PREFIX}{replica}-srv", f"{NS_PREFIX}{replica}-cli"


def stop_process(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def remove_namespaces(names=None) -> None:
    """Delete our namespaces (all of ours if names is None), ending any
    process still inside them (left by this script)."""
    existing = [line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines()
                if line.strip()]
    for ns in existing:
        if not ns.startswith(NS_PREFIX) or (names is not None and ns not in names):
            continue
        pids = [int(p) for p in run(["ip", "netns", "pids", ns], check=False).stdout.split()]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 3
            while pids and time.time() < deadline:
                pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
                time.sleep(0.05)
        run(["ip", "netns", "del", ns], check=False)


class Replica:
    def __init__(self, name: str, workdir: str, www: str, natural_date: bool):
        self.name = name
        self.srv, self.cli = ns_names(name)
        self.workdir = workdir
        self.www = www
        self.natural_date = natural_date
        self.procs = []
        self.logs = []

    # setup -----------------------------------------------------------------
    def build(self) -> None:
        cfg = REPLICAS[self.name]
        for ns in (self.srv, self.cli):
            run(["ip", "netns", "add", ns])
            run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], ns=ns)
            run(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"], ns=ns)
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "link", "add", "name", IFNAME, "netns", self.srv, "address", SERVER_MAC,
             "mtu", str(cfg["mtu"]), "type", "veth",
             "peer", "name", IFNAME, "netns", self.cli, "address", CLIENT_MAC,
             "mtu", str(cfg["mtu"])])
        if cfg["ethtool"]:
            run(["ethtool", "-K", IFNAME] + cfg["ethtool"], ns=self.srv)
        for ns, ip in ((self.srv, SERVER_IP), (self.cli, CLIENT_IP)):
            run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", IFNAME])
            run(["ip", "-n", ns, "link", "set", IFNAME, "up"])

    def describe(self) -> dict:
        k = run(["ethtool", "-k", IFNAME], ns=self.srv).stdout
        feats = {}
        for line in k.splitlines():
            key, _, val = line.strip().partition(": ")
            if key in ("tcp-segmentation-offload", "generic-segmentation-offload",
                       "tx-checksumming", "scatter-gather", "generic-receive-offload"):
                feats[key] = val.split()[0]
        return {"server_netns": self.srv, "client_netns": self.cli,
                "mtu": REPLICAS[self.name]["mtu"],
                "ethtool_K": " ".join(REPLICAS[self.name]["ethtool"]) or "(defaults)",
                "server_offloads": feats}

    def spawn(self, ns, cmd, tag, **kw) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, f"{self.name}-{tag}.log"), "w")
        self.logs.append(log)
        p = subprocess.Popen(["ip", "netns", "exec", ns] + cmd, stdout=log,
                             stderr=kw.pop("stderr", log), stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def start_services(self) -> None:
        if self.natural_date:
            http = [sys.executable, "-m", "http.server", "--bind", SERVER_IP,
                    "--directory", self.www, str(HTTP_PORT)]
        else:
            http = [sys.executable, SCRIPT, "_http", self.www]
        self.spawn(self.srv, http, "http")
        self.spawn(self.srv, [sys.executable, SCRIPT, "_dns"], "dns")
        redis_dir = os.path.join(self.workdir, f"redis-{self.name}")
        os.makedirs(redis_dir, exist_ok=True)
        self.spawn(self.srv, ["redis-server", "--bind", SERVER_IP, "--port", str(REDIS_PORT),
                              "--save", "", "--appendonly", "no", "--protected-mode", "no",
                              "--daemonize", "no", "--dir", redis_dir], "redis")
        # wait until every service listens, from inside the server namespace
        # (probing from the client would put refused connections in the capture)
        want = {("tcp", HTTP_PORT), ("tcp", REDIS_PORT), ("udp", DNS_PORT)}
        deadline = time.time() + 20
        while True:
            have = set()
            for proto, flag in (("tcp", "-Hltn"), ("udp", "-Hlun")):
                for line in run(["ss", flag], ns=self.srv).stdout.splitlines():
                    local = line.split()[3]
                    have.add((proto, int(local.rsplit(":", 1)[1])))
            if want <= have:
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"replica {self.name}: {p.args} exited with {p.returncode}"
                                       f" (logs in {self.workdir})")
            if time.time() > deadline:
                raise RuntimeError(f"replica {self.name}: services not listening: {want - have}")
            time.sleep(0.1)

    def capture_workload(self, pcap: str) -> dict:
        tcpdump = self.spawn(self.srv, ["tcpdump", "-i", IFNAME, "-w", pcap, "-s", "0", "-n",
                                        "-Z", "root"], "tcpdump", stderr=subprocess.PIPE)
        line = tcpdump.stderr.readline().decode()
        if "listening on" not in line:
            raise RuntimeError(f"tcpdump did not start: {line.strip()}")
        time.sleep(0.3)
        r = run([sys.executable, SCRIPT, "_client"], ns=self.cli)
        client = json.loads(r.stdout)
        time.sleep(1.0)                  # the last FIN/ACKs
        tcpdump.send_signal(signal.SIGINT)
        _, err = tcpdump.communicate(timeout=10)
        stats = (line + err.decode()).strip().splitlines()
        if "0 packets dropped by kernel" not in [s.strip() for s in stats]:
            raise RuntimeError(f"tcpdump dropped packets: {stats}")
        return {"client": client, "tcpdump": stats[1:]}

    def teardown(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)
        for log in self.logs:
            log.close()
        self.procs, self.logs = [], []
        remove_namespaces({self.srv, self.cli})


# ===========================================================================
# reading the captures back
# ===========================================================================

def read_pcap(path: str):
    """[(frame number from 1, ts_us, data)] of a classic pcap."""
    with open(path, "rb") as f:
        raw = f.read()
    magic = raw[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(endian + "I", raw[20:24])[0]
    if linktype != 1:
        raise ValueError(f"{path}: link type {linktype}, not Ethernet")
    out, off, n = [], 24, 0
    while off + 16 <= len(raw):
        sec, frac, caplen, _ = struct.unpack(endian + "4I", raw[off:off + 16])
        n += 1
        out.append((n, sec * 1_000_000 + (frac // 1000 if nano else frac),
                    raw[off + 16:off + 16 + caplen]))
        off += 16 + caplen
    return out


def mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def parse_frame(data: bytes) -> dict:
    """What the analysis needs of one Ethernet frame."""
    f = {"src_mac": mac(data[6:12]), "len": len(data)}
    etype = struct.unpack("!H", data[12:14])[0]
    if etype == 0x0806:
        f["proto"] = "arp"
        f["arp_op"] = struct.unpack("!H", data[20:22])[0]
        return f
    if etype != 0x0800:
        f["proto"] = f"ethertype-0x{etype:04x}"
        return f
    ip = data[14:]
    ihl = (ip[0] & 0xF) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    f["ip_id"] = struct.unpack("!H", ip[4:6])[0]
    proto = ip[9]
    f["src"], f["dst"] = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    l4 = ip[ihl:total]
    if proto == 6:
        sport, dport, seq, ack, off_flags = struct.unpack("!HHIIH", l4[:14])
        doff = (off_flags >> 12) * 4
        f.update(proto="tcp", sport=sport, dport=dport, seq=seq, ack=ack,
                 flags=off_flags & 0x1FF, payload=bytes(l4[doff:]))
    elif proto == 17:
        sport, dport = struct.unpack("!HH", l4[:4])
        f.update(proto="udp", sport=sport, dport=dport, payload=bytes(l4[8:]))
    elif proto == 1:
        f.update(proto="icmp", icmp_type=l4[0], payload=bytes(l4))
    else:
        f["proto"] = f"ip-proto-{proto}"
    return f


SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def flow_name(f: dict):
    """(flow key, direction) with the key naming client then server."""
    if f["src"] == SERVER_IP:
        return (f["proto"], f"{f['dst']}:{f['dport']}", f"{f['src']}:{f['sport']}"), "s2c"
    return (f["proto"], f"{f['src']}:{f['sport']}", f"{f['dst']}:{f['dport']}"), "c2s"


def describe_flow(key) -> str:
    proto, client, server = key
    cport, sport = int(client.rsplit(":", 1)[1]), int(server.rsplit(":", 1)[1])
    for port, method, path in HTTP_REQUESTS:
        if proto == "tcp" and cport == port:
            return f"HTTP {method} {path}"
    if proto == "tcp" and cport == REDIS_CLIENT_PORT:
        return "redis: " + ", ".join(c[0] for c in REDIS_COMMANDS)
    if proto == "udp" and sport == DNS_PORT:
        return f"DNS: {len(DNS_QUERIES)} queries"
    return proto


def analyse(path: str) -> dict:
    frames = read_pcap(path)
    counts = {}
    tcp, dgrams, icmp_replies = {}, {}, []
    for n, ts, data in frames:
        f = parse_frame(data)
        f["n"], f["ts"] = n, ts
        side = "server" if f["src_mac"] == SERVER_MAC else "client"
        label = f["proto"]
        if label == "tcp":
            label = "tcp/http" if HTTP_PORT in (f["sport"], f["dport"]) else \
                "tcp/redis" if REDIS_PORT in (f["sport"], f["dport"]) else "tcp"
        elif label == "udp":
            label = "udp/dns" if DNS_PORT in (f["sport"], f["dport"]) else "udp"
        c = counts.setdefault(label, {"frames": 0, "from_server": 0, "from_client": 0})
        c["frames"] += 1
        c["from_" + side] += 1
        if f["proto"] == "tcp":
            key, d = flow_name(f)
            fl = tcp.setdefault(key, {"frames": {"s2c": [], "c2s": []}})
            fl["frames"][d].append(f)
        elif f["proto"] == "udp" and f["src"] == SERVER_IP:
            key, _ = flow_name(f)
            dgrams.setdefault(key, []).append(f)
        elif f["proto"] == "icmp" and f["src"] == SERVER_IP:
            icmp_replies.append(f)
    flows = {}
    for key, fl in tcp.items():
        out = {}
        for d in ("s2c", "c2s"):
            fr = fl["frames"][d]
            syn = [f for f in fr if f["flags"] & SYN]
            if not syn:
                raise ValueError(f"{path}: flow {key} has no SYN in direction {d}")
            isn = syn[0]["seq"]
            stream = bytearray()
            covered = []
            for f in fr:
                if not f["payload"]:
                    continue
                rel = (f["seq"] - isn - 1) % (1 << 32)
                end = rel + len(f["payload"])
                if end > len(stream):
                    stream.extend(b"\0" * (end - len(stream)))
                stream[rel:end] = f["payload"]
                covered.append((rel, end, f["n"]))
            have = sorted((a, b) for a, b, _ in covered)
            pos = 0
            for a, b in have:
                if a > pos:
                    raise ValueError(f"{path}: flow {key} {d}: hole at stream offset {pos}")
                pos = max(pos, b)
            out[d] = {"isn": isn, "stream": bytes(stream), "segments": covered,
                      "frames": len(fr), "data_frames": len(covered),
                      "max_payload": max((len(f["payload"]) for f in fr), default=0),
                      "fin": any(f["flags"] & FIN for f in fr),
                      "rst": any(f["flags"] & RST for f in fr)}
        flows[key] = out
    return {"path": path, "frames": len(frames), "bytes": os.path.getsize(path),
            "counts": dict(sorted(counts.items())), "tcp": flows, "udp": dgrams,
            "icmp_replies": icmp_replies}


def byte_ranges(a: bytes, b: bytes):
    """Differing byte ranges [start, end) of two equal-length byte strings."""
    out, start = [], None
    for i in range(len(a)):
        if a[i] != b[i]:
            if start is None:
                start = i
        elif start is not None:
            out.append([start, i])
            start = None
    if start is not None:
        out.append([start, len(a)])
    return out


def in_date_header(stream: bytes, start: int, end: int) -> bool:
    """Whether stream[start:end] lies inside an HTTP response's Date value."""
    head_end = stream.find(b"\r\n\r\n")
    i = stream.find(b"\r\nDate: ", 0, head_end)
    if i < 0:
        return False
    value_start = i + len(b"\r\nDate: ")
    return value_start <= start and end <= stream.find(b"\r\n", value_start)


def compare_pair(name: str, A: dict, B: dict, plant: dict | None) -> dict:
    flows, problems = [], []
    for key in sorted(set(A["tcp"]) | set(B["tcp"]), key=lambda k: k[1]):
        if key not in A["tcp"] or key not in B["tcp"]:
            problems.append(f"TCP flow {key} only in one capture")
            continue
        fa, fb = A["tcp"][key], B["tcp"][key]
        entry = {"proto": "tcp", "client": key[1], "server": key[2], "what": describe_flow(key),
                 "server_stream_bytes": len(fa["s2c"]["stream"]),
                 "client_stream_bytes": len(fa["c2s"]["stream"]),
                 "isn": {r: {"server": f["s2c"]["isn"], "client": f["c2s"]["isn"]}
                         for r, f in (("a", fa), ("b", fb))},
                 "server_frames": {"a": fa["s2c"]["frames"], "b": fb["s2c"]["frames"]},
                 "server_data_frames": {"a": fa["s2c"]["data_frames"], "b": fb["s2c"]["data_frames"]},
                 "server_max_payload": {"a": fa["s2c"]["max_payload"], "b": fb["s2c"]["max_payload"]},
                 "client_frames": {"a": fa["c2s"]["frames"], "b": fb["c2s"]["frames"]},
                 "differences": []}
        for d, who in (("s2c", "server"), ("c2s", "client")):
            sa, sb = fa[d]["stream"], fb[d]["stream"]
            if len(sa) != len(sb):
                problems.append(f"{key} {who} stream length {len(sa)} vs {len(sb)}")
                continue
            for start, end in byte_ranges(sa, sb):
                if d == "s2c" and in_date_header(sa, start, end):
                    entry["natural_differences"] = ["HTTP Date header (plain http.server)"]
                    continue
                entry["differences"].append({"direction": f"{who}->{'client' if who == 'server' else 'server'}",
                                             "stream_offset": start, "length": end - start,
                                             "a": sa[start:end].hex(), "b": sb[start:end].hex()})
        if ([(a, b) for a, b, _ in fa["s2c"]["segments"]]
                != [(a, b) for a, b, _ in fb["s2c"]["segments"]]):
            entry["server_segmentation_differs"] = True
        flows.append(entry)

    for key in sorted(set(A["udp"]) | set(B["udp"]), key=lambda k: k[1]):
        da, db = A["udp"].get(key, []), B["udp"].get(key, [])
        entry = {"proto": "udp", "client": key[1], "server": key[2], "what": describe_flow(key),
                 "server_datagrams": {"a": len(da), "b": len(db)}, "differences": []}
        for i, (x, y) in enumerate(zip(da, db)):
            if x["payload"] != y["payload"]:
                entry["differences"].append({
                    "datagram": i, "frame_a": x["n"], "frame_b": y["n"],
                    "ranges": byte_ranges(x["payload"], y["payload"])
                    if len(x["payload"]) == len(y["payload"]) else "length",
                    "note": "DNS transaction ID (the query with a random ID)"
                    if x["payload"][2:] == y["payload"][2:] else ""})
        flows.append(entry)

    ia, ib = A["icmp_replies"], B["icmp_replies"]
    entry = {"proto": "icmp", "client": CLIENT_IP, "server": SERVER_IP,
             "what": f"ping -c {PING_COUNT} -e {PING_ID} (echo replies)",
             "server_frames": {"a": len(ia), "b": len(ib)}, "differences": []}
    for i, (x, y) in enumerate(zip(ia, ib)):
        if x["payload"] != y["payload"]:
            entry["differences"].append({"reply": i, "frame_a": x["n"], "frame_b": y["n"],
                                         "icmp_ranges": byte_ranges(x["payload"], y["payload"]),
                                         "note": "icmp checksum and the sender's timestamp "
                                                 "(timeval, ICMP bytes 8-23) echoed back"})
    flows.append(entry)

    planted = None
    http_big = next(f for f in flows if f["proto"] == "tcp" and f["what"] == f"HTTP GET /{PLANT_FILE}")
    tcp_diffs = [(f, d) for f in flows if f["proto"] == "tcp" for d in f["differences"]]
    if plant is None:
        if tcp_diffs:
            problems.append(f"equal pair: TCP streams differ: {tcp_diffs}")
    else:
        key = ("tcp", http_big["client"], http_big["server"])
        stream_a = A["tcp"][key]["s2c"]["stream"]
        header_len = stream_a.index(b"\r\n\r\n") + 4
        offset = header_len + plant["file_offset"]
        want = [{"direction": "server->client", "stream_offset": offset, "length": 1,
                 "a": f"{plant['byte_a']:02x}", "b": f"{plant['byte_b']:02x}"}]
        if [d for _, d in tcp_diffs] != want:
            problems.append(f"diverge pair: expected only {want}, found {tcp_diffs}")

        def where(side):
            fl = side["tcp"][key]["s2c"]
            return [n for a, b, n in fl["segments"] if a <= offset < b], fl["isn"]
        frames_a, isn_a = where(A)
        frames_b, isn_b = where(B)
        planted = {"flow": {"proto": "tcp", "client": http_big["client"],
                            "server": http_big["server"]},
                   "direction": "server->client",
                   "what": f"one byte of /{PLANT_FILE} served by replica b",
                   "file": plant["file"], "file_offset": plant["file_offset"],
                   "byte_a": plant["byte_a"], "byte_b": plant["byte_b"],
                   "byte_a_char": chr(plant["byte_a"]), "byte_b_char": chr(plant["byte_b"]),
                   "response_header_length": header_len,
                   "response_header": stream_a[:header_len].decode(),
                   "stream_offset": offset,
                   "stream_offset_origin": "server ISN + 1 (first byte after the SYN-ACK)",
                   "seq_a": (isn_a + 1 + offset) % (1 << 32),
                   "seq_b": (isn_b + 1 + offset) % (1 << 32),
                   "frames_a": frames_a, "frames_b": frames_b}
    if problems:
        raise RuntimeError(f"{name} pair is not as intended:\n  " + "\n  ".join(map(str, problems)))
    return {"flows": flows, "planted": planted}


# ===========================================================================

NATURAL_DIFFERENCES = [
    "TCP initial sequence numbers of both ends (so every TCP seq and ack number)",
    "TCP timestamp option values (per-connection random offset, clock)",
    "IP IDs",
    "segmentation of the server's TCP data: replica a sends GSO frames (TSO/GSO on), "
    "replica b MSS-sized segments (tso off gso off); also timing-driven flights on both",
    "pure ACK count and timing, TCP windows",
    "ICMP echo replies: the echoed sender timestamp (ICMP bytes 8-23) and the ICMP checksum",
    "DNS: the last query uses a random transaction ID, so its answer differs in bytes 0-1",
    "frame timing (capture timestamps)",
    "ARP: the server's own ARP probes for the client, when the neighbour entry ages",
]


def capture_pair(pair: str, out_dir: str, workdir: str, natural_date: bool) -> dict:
    plant_info = None
    replicas = {}
    runs = {}
    try:
        for r in ("a", "b"):
            www = os.path.join(workdir, f"www-{pair}-{r}")
            info = write_www(www, plant=(pair == "diverge" and r == "b"))
            if info:
                plant_info = info
            replicas[r] = Replica(r, workdir, www, natural_date)
            replicas[r].build()
        for r in ("a", "b"):
            replicas[r].start_services()
        for r in ("a", "b"):
            tmp = os.path.join(workdir, f"{pair}-{r}.pcap")
            runs[r] = replicas[r].capture_workload(tmp)
            runs[r]["setup"] = replicas[r].describe()
    finally:
        for rep in replicas.values():
            rep.teardown()
    analyses = {r: analyse(os.path.join(workdir, f"{pair}-{r}.pcap")) for r in ("a", "b")}
    result = compare_pair(pair, analyses["a"], analyses["b"], plant_info)
    for r in ("a", "b"):
        shutil.copyfile(os.path.join(workdir, f"{pair}-{r}.pcap"),
                        os.path.join(out_dir, f"{pair}-{r}.pcap"))
    return {
        "a": f"{pair}-a.pcap", "b": f"{pair}-b.pcap",
        "served_files_identical": pair == "equal",
        "replicas": {r: {"setup": runs[r]["setup"], "tcpdump": runs[r]["tcpdump"],
                         "frames": analyses[r]["frames"], "file_bytes": analyses[r]["bytes"],
                         "counts": analyses[r]["counts"],
                         "client_saw": runs[r]["client"]} for r in ("a", "b")},
        "flows": result["flows"],
        "natural_differences": NATURAL_DIFFERENCES,
        "planted": result["planted"],
    }


def tool_versions() -> dict:
    def first(cmd):
        r = subprocess.run(cmd, capture_output=True, text=True)
        return ((r.stdout or r.stderr).strip().splitlines() or [""])[0]
    return {"python": sys.version.split()[0],
            "tcpdump": first(["tcpdump", "--version"]),
            "redis-server": first(["redis-server", "--version"]),
            "iproute2": first(["ip", "-V"]),
            "ping": first(["ping", "-V"]),
            "ethtool": first(["ethtool", "--version"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=HERE, help="where to write the captures (default: %(default)s)")
    ap.add_argument("--natural-date", action="store_true",
                    help="run plain 'python3 -m http.server' (its Date: header may then differ)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("run as root (network namespaces)")
    for tool in ("ip", "tcpdump", "ethtool", "ping", "redis-server", "ss", "sysctl"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found (apt-get install iproute2 tcpdump ethtool "
                     f"iputils-ping redis-server procps)")
    os.makedirs(args.out, exist_ok=True)

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    remove_namespaces()              # leftovers of an interrupted run
    workdir = tempfile.mkdtemp(prefix="colorep-")
    os.chmod(workdir, 0o755)
    try:
        pairs = {}
        for pair in ("equal", "diverge"):
            print(f"capturing the {pair} pair ...", flush=True)
            pairs[pair] = capture_pair(pair, args.out, workdir, args.natural_date)
        expected = {
            "generator": "tests/replicas/make_replicas.py",
            "kernel": os.uname().release,
            "tools": tool_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "replica": {"ip": SERVER_IP, "mac": SERVER_MAC},
            "client": {"ip": CLIENT_IP, "mac": CLIENT_MAC},
            "capture_point": "server side of the veth, both directions (tcpdump -i veth0 -s 0)",
            "replica_output_filter": f"ether src {SERVER_MAC}",
            "http_date_pinned": None if args.natural_date else FIXED_DATE,
            "pairs": pairs,
        }
        path = os.path.join(args.out, "expected.json")
        with open(path, "w") as f:
            json.dump(expected, f, indent=1)
            f.write("\n")
    finally:
        remove_namespaces()
        if args.keep_workdir:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print("wrote:")
    for name in ("equal-a.pcap", "equal-b.pcap", "diverge-a.pcap", "diverge-b.pcap", "expected.json"):
        p = os.path.join(args.out, name)
        print(f"  {p}  ({os.path.getsize(p)} bytes)")
    for pair, info in pairs.items():
        for r in ("a", "b"):
            rep = info["replicas"][r]
            counts = ", ".join(f"{k} {v['frames']}" for k, v in rep["counts"].items())
            print(f"  {pair}-{r}.pcap: {rep['frames']} frames: {counts}")
    p = pairs["diverge"]["planted"]
    print(f"  planted byte: {p['file']} offset {p['file_offset']} "
          f"({p['byte_a_char']!r} -> {p['byte_b_char']!r}), flow {p['flow']['client']} -> "
          f"{p['flow']['server']}, server stream offset {p['stream_offset']} "
          f"(header {p['response_header_length']} + {p['file_offset']}); "
          f"frames a {p['frames_a']}, b {p['frames_b']}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        cmd = sys.argv[1]
        if cmd == "_http":
            serve_http(sys.argv[2])
        elif cmd == "_dns":
            serve_dns()
        elif cmd == "_client":
            run_client()
        else:
            sys.exit(f"unknown subcommand {cmd}")
        sys.exit(0)
    sys.exit(main())
