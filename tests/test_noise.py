"""Noise rules (--ignore), noise learning (--learn-noise) and the Wireshark
evidence file (--evidence)."""

import json
import struct

import dpkt
import pytest

from colo_cli.capture import PcapWriter
from colo_cli.cli import main
from colo_cli.core.noise import RuleError, mask_datagram, mask_segment, parse_rule
from colo_cli.learn import suggest
from colo_cli.testing import icmp_frame, tcp_frame, udp_frame

from scripts import P, S, miscompares, out_frames, run


def dns(txid: int, ttl: int = 300) -> bytes:
    return (struct.pack(">H", txid) + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
            b"\x07example\x03org\x00\x00\x01\x00\x01\xc0\x0c\x00\x01\x00\x01"
            + struct.pack(">I", ttl) + b"\x00\x04\xc0\x00\x02\x0a")


def http(date: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nDate: " + date + b"\r\nContent-Length: 5\r\n\r\nhello"


# -- parsing ------------------------------------------------------------------------

def test_rules_parse():
    assert parse_rule("dns.id").port == 53
    assert parse_rule("udp:5000:2-4").ranges[0] == (10, 12)       # after the 8-byte header
    assert parse_rule("udp:*:0-1").port is None
    assert parse_rule("tcp:80:/X-Id: [0-9]+/").pattern.search(b"X-Id: 42")
    for bad in ("nope", "udp:53", "udp:x:1-2", "udp:53:4-2", "udp:70000:1-2", "tcp:80:X",
                "tcp:80:/(/", "tcp:80:/a*/"):
        with pytest.raises(RuleError):
            parse_rule(bad)


def test_masking():
    # dns.id: the UDP checksum (6-7) and the first two payload bytes (8-9)
    assert mask_datagram(b"\xff" * 12, (parse_rule("dns.id"),)) == b"\xff" * 6 + b"\0" * 4 + b"\xff\xff"
    seg = b"HTTP/1.1 200 OK\r\nDate: Wed\r\nX: 1\r\n"
    masked = mask_segment(seg, (parse_rule("http.date"),))
    assert len(masked) == len(seg) and b"Wed" not in masked and masked.endswith(b"X: 1\r\n")
    assert mask_segment(b"nothing", (parse_rule("http.date"),)) == b"nothing"


# -- in the comparator ---------------------------------------------------------------

def test_dns_id_rule_hides_the_id_and_the_checksum_and_nothing_else():
    p, s = udp_frame(dns(0x1111), sport=53), udp_frame(dns(0x2222), sport=53)
    c, events = run([(P, p, 0), (S, s, 1)], ignore=(parse_rule("dns.id"),))
    assert out_frames(events) == [p] and c.stats.ignored == {"dns.id": 1}
    # another byte still counts
    s2 = udp_frame(dns(0x2222, ttl=299), sport=53)
    _, events = run([(P, p, 0), (S, s2, 1)], ignore=(parse_rule("dns.id"),))
    assert miscompares(events) and out_frames(events) == []
    # and without the rule the ID is a divergence
    _, events = run([(P, p, 0), (S, s, 1)])
    assert miscompares(events)


def test_udp_range_rule_only_on_its_port():
    rule = parse_rule("udp:7000:0-4")
    p, s = udp_frame(b"AAAA-same", dport=7000), udp_frame(b"BBBB-same", dport=7000)
    _, events = run([(P, p, 0), (S, s, 1)], ignore=(rule,))
    assert out_frames(events) == [p]
    p, s = udp_frame(b"AAAA-same", dport=7001), udp_frame(b"BBBB-same", dport=7001)
    _, events = run([(P, p, 0), (S, s, 1)], ignore=(rule,))
    assert miscompares(events)


def test_http_date_rule_on_a_tcp_stream():
    p = tcp_frame(http(b"Wed, 25 Nov 2026 20:00:00 GMT"), seq=100, ack=1)
    s = tcp_frame(http(b"Wed, 25 Nov 2026 20:00:01 GMT"), seq=100, ack=1)
    _, events = run([(P, p, 0), (S, s, 1)], ignore=(parse_rule("http.date"),))
    assert out_frames(events) == [p]
    _, events = run([(P, p, 0), (S, s, 1)])
    assert miscompares(events)[0].stream_offset == len(b"HTTP/1.1 200 OK\r\nDate: Wed, 25 Nov 2026 20:00:0")


def test_tcp_rule_with_a_value_of_another_length_still_miscompares():
    rule = parse_rule("tcp:80:/X-Id: [0-9]+/")
    p = tcp_frame(b"X-Id: 42\r\nbody", seq=100, ack=1)
    s = tcp_frame(b"X-Id: 4242\r\nbody", seq=100, ack=1)
    _, events = run([(P, p, 0), (S, s, 1)], ignore=(rule,))
    assert miscompares(events)


def test_icmp_checksum_rule():
    p = icmp_frame(b"ping")
    s = bytearray(p)
    s[36] ^= 1                                   # the ICMP checksum
    _, events = run([(P, p, 0), (S, bytes(s), 1)], ignore=(parse_rule("icmp.checksum"),))
    assert out_frames(events) == [p]


def test_suggestions():
    _, events = run([(P, udp_frame(dns(1), sport=53), 0), (S, udp_frame(dns(2), sport=53), 1)])
    assert suggest(miscompares(events)[0]) == "dns.id"
    _, events = run([(P, udp_frame(b"xxAAyy", sport=9), 0), (S, udp_frame(b"xxBByy", sport=9), 1)])
    assert suggest(miscompares(events)[0]) == "udp:9:2-4"
    p = tcp_frame(http(b"Wed 1"), seq=1, ack=1)
    s = tcp_frame(http(b"Wed 2"), seq=1, ack=1)
    _, events = run([(P, p, 0), (S, s, 1)])
    assert suggest(miscompares(events)[0]) == "http.date"
    p = tcp_frame(b"HTTP/1.1 200 OK\r\nETag: \"abc\"\r\n\r\n", seq=1, ack=1)
    s = tcp_frame(b"HTTP/1.1 200 OK\r\nETag: \"abd\"\r\n\r\n", seq=1, ack=1)
    _, events = run([(P, p, 0), (S, s, 1)])
    rule = suggest(miscompares(events)[0])
    assert rule.startswith("tcp:80:/") and "ETag" in rule
    parse_rule(rule)                              # a suggestion is a valid rule


# -- the CLI: --ignore, --learn-noise, --evidence ----------------------------------------

def write(path, frames):
    with open(path, "wb") as f:
        w = PcapWriter(f)
        for i, frame in enumerate(frames):
            w.write(1_000_000_000 + i * 1_000_000, frame)


@pytest.fixture
def noisy_pair(tmp_path):
    """Equivalent replicas that differ in a DNS ID, an HTTP Date and an
    X-Request-Id header."""
    p = [udp_frame(dns(0x1000 + i), sport=53, dport=40000 + i) for i in range(3)]
    s = [udp_frame(dns(0x9000 + i), sport=53, dport=40000 + i) for i in range(3)]
    body_p = http(b"Wed, 25 Nov 2026 20:00:00 GMT")
    body_s = http(b"Wed, 25 Nov 2026 20:00:07 GMT")
    p.append(tcp_frame(body_p, seq=1000, ack=1))
    s.append(tcp_frame(body_s, seq=1000, ack=1))
    p.append(tcp_frame(b"HTTP/1.1 200 OK\r\nX-Request-Id: 7f3a\r\n\r\n", seq=1, ack=1, sport=81))
    s.append(tcp_frame(b"HTTP/1.1 200 OK\r\nX-Request-Id: 9c1b\r\n\r\n", seq=1, ack=1, sport=81))
    write(tmp_path / "p.pcap", p)
    write(tmp_path / "s.pcap", s)
    return str(tmp_path / "p.pcap"), str(tmp_path / "s.pcap")


def test_ignore_options_make_a_noisy_pair_match_and_are_reported(noisy_pair, capsys):
    args = ["replay", *noisy_pair, "--json", "--no-timeout", "--ignore", "dns.id",
            "--ignore", "http.date", "--ignore", "tcp:81:/X-Request-Id: [0-9a-f]+/"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    doc = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0 and doc["result"] == "match"
    assert doc["settings"]["ignore"] == ["dns.id", "http.date", "tcp:81:/X-Request-Id: [0-9a-f]+/"]
    assert doc["stats"]["ignored"] == {"dns.id": 3}
    with pytest.raises(SystemExit):
        main(args[:3] + args[4:] + ["--hexdump", "0"])
    assert "settings: no timeouts; ignoring dns.id, http.date" in capsys.readouterr().out


def test_learn_noise_finds_the_rules_and_counts_what_each_avoids(noisy_pair, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["replay", *noisy_pair, "--learn-noise", "--json", "--no-timeout"])
    assert exc.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    rules = {r["rule"]: r for r in doc["rules"]}
    # (the flow is 81 -> 80: a rule names the lower port, and holds for either)
    assert set(rules) == {"dns.id", "http.date", "tcp:80:/(?im)^X\\-Request\\-Id:[ \\t]*[^\\r\\n]*/"}
    assert rules["dns.id"]["explains_miscompares"] == 3 and rules["dns.id"]["checkpoints_avoided"] == 3
    assert rules["http.date"]["checkpoints_avoided"] == 1
    assert doc["checkpoint_requests"] == {"before": 5, "after": 0}
    # the suggested options really make the pair match
    args = ["replay", *noisy_pair, "-q", "--no-timeout"]
    for r in doc["rules"]:
        args += ["--ignore", r["rule"]]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0


def test_learn_noise_table_and_stdin_refused(noisy_pair, capsys):
    with pytest.raises(SystemExit):
        main(["replay", *noisy_pair, "--learn-noise", "--no-timeout"])
    out = capsys.readouterr().out
    assert "checkpoint requests 5 -> 0" in out and "--ignore 'dns.id'" in out
    with pytest.raises(SystemExit) as exc:
        main(["replay", "-", noisy_pair[1], "--learn-noise"])
    assert exc.value.code == 2


def test_evidence_file_opens_with_dpkt_with_interfaces_and_comments(noisy_pair, tmp_path, capsys):
    ev = tmp_path / "ev.pcapng"
    with pytest.raises(SystemExit) as exc:
        main(["replay", *noisy_pair, "-q", "--no-timeout", "--evidence", str(ev)])
    assert exc.value.code == 1
    raw = ev.read_bytes()
    # interfaces: the IDBs carry if_name primary and secondary
    assert b"primary" in raw and b"secondary" in raw
    frames, comments = [], []
    with open(ev, "rb") as f:
        for block_ts, buf in dpkt.pcapng.Reader(f):
            frames.append(buf)
    # comments, read from the Enhanced Packet Blocks themselves
    pos = 0
    ifaces = []
    while pos < len(raw):
        btype, blen = struct.unpack_from("<II", raw, pos)
        if btype == 6:
            epb = dpkt.pcapng.EnhancedPacketBlockLE(raw[pos:pos + blen])
            ifaces.append(epb.iface_id)
            comments.append(next((o.text for o in epb.opts if o.code == 1), None))
        pos += blen
    assert len(frames) == 10                        # 5 miscompares, both sides
    assert ifaces == [0, 1] * 5
    assert all(c and c.startswith("miscompare ") for c in comments)
    assert "content differs in udp 10.0.0.1:53 > 10.0.0.2:40000" in comments[0]
    assert "first differing byte at offset 40 of this frame" in comments[0]
    assert any("tcp" in c and "stream offset" in c for c in comments)
