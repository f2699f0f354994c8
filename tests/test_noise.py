"""Noise rules (--ignore), noise learning (--learn-noise) and the Wireshark
evidence file (--evidence)."""

import json
import struct

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colo_cli.capture import PcapWriter
from colo_cli.cli import main
from colo_cli.core.fields import dns_ttl_spans
from colo_cli.core.noise import WAIT, RuleError, mask_datagram, parse_rule, stream_match
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
    assert parse_rule("dns.ttl").port == 53 and parse_rule("ntp.timestamps").port == 123
    header = parse_rule("http.header:X-Request-Id")
    assert header.port is None and header.pattern.search(b"\r\nx-request-id: 7f3a\r\n")
    assert not header.pattern.search(b"\r\nX-Request-Idx: 7f3a\r\n")
    assert parse_rule("http.date").pattern.pattern == parse_rule("http.header:Date").pattern.pattern
    for bad in ("nope", "udp:53", "udp:x:1-2", "udp:53:4-2", "udp:70000:1-2", "tcp:80:X",
                "tcp:80:/(/", "tcp:80:/a*/", "http.header:", "http.header:a b", "http.header:x:y",
                "dns.ttl2"):
        with pytest.raises(RuleError):
            parse_rule(bad)


def test_masking():
    # dns.id: the UDP checksum (6-7) and the first two payload bytes (8-9)
    assert mask_datagram(b"\xff" * 12, (parse_rule("dns.id"),)) == b"\xff" * 6 + b"\0" * 4 + b"\xff\xff"
    # ntp.timestamps: payload bytes 16-47 (and the checksum)
    ntp = bytes(8) + bytes(range(1, 49))
    masked = mask_datagram(ntp, (parse_rule("ntp.timestamps"),))
    assert masked[8:24] == ntp[8:24] and masked[24:56] == bytes(32)


def dns_l4(answers=1, ttls=(300,), opt=False, additional=()) -> bytes:
    """A UDP header and a DNS response: one question, answers with the
    given TTLs (the first by compression pointer, the rest by full name)."""
    msg = struct.pack(">HHHHHH", 7, 0x8180, 1, answers, 0, len(additional) + int(opt))
    msg += b"\x07example\x03org\x00\x00\x01\x00\x01"
    for i, ttl in enumerate(ttls):
        name = b"\xc0\x0c" if i == 0 else b"\x03www\x07example\x03org\x00"
        msg += name + struct.pack(">HHIH", 1, 1, ttl, 4) + bytes([192, 0, 2, i])
    for ttl in additional:
        msg += b"\x02ns\xc0\x0c" + struct.pack(">HHIH", 28, 1, ttl, 16) + bytes(16)
    if opt:
        msg += b"\x00" + struct.pack(">HHIH", 41, 1232, 0x8000, 0)
    return struct.pack(">HHHH", 53, 40000, 8 + len(msg), 0) + msg


def test_dns_ttl_locator_finds_every_record_ttl_and_never_the_opt_flags():
    l4 = dns_l4(answers=2, ttls=(300, 60), opt=True, additional=(99,))
    spans = dns_ttl_spans(l4)
    assert [int.from_bytes(l4[a:b], "big") for a, b in spans] == [300, 60, 99]
    assert all(b - a == 4 for a, b in spans)
    # damaged messages: what is surely a TTL, nothing past the damage, no exception
    assert dns_ttl_spans(l4[:60]) == spans[:1]
    for cut in range(len(l4)):
        assert set(dns_ttl_spans(l4[:cut])) <= set(spans)
    assert dns_ttl_spans(b"") == [] and dns_ttl_spans(bytes(8) + b"\xff" * 40) == []
    looped = bytearray(l4)
    looped[20:22] = b"\xc0\x0c"                 # the question's name points at itself
    assert all(0 <= a < b <= len(looped) for a, b in dns_ttl_spans(bytes(looped)))


@pytest.mark.parametrize("cut", range(0, 120, 7))
def test_dns_ttl_locator_never_raises_on_garbage(cut):
    import random
    rng = random.Random(cut)
    for _ in range(200):
        buf = bytes(rng.randrange(256) for _ in range(cut))
        for a, b in dns_ttl_spans(buf):
            assert 0 <= a < b <= len(buf)


def test_stream_match_is_a_function_of_the_bytes_not_the_segments():
    date = (parse_rule("http.date").pattern,)
    p = b"HTTP/1.1 200 OK\r\nDate: Wed 1\r\nX: y"
    s = b"HTTP/1.1 200 OK\r\nDate: Wed 2\r\nX: y"
    at = p.index(b"1\r\n")
    # the rest of the value (one byte) is hidden
    assert stream_match(date, p, at, False, s, at, False) == 1
    # a value that reaches the end of what a side sent may go on: wait
    assert stream_match(date, p[:at + 1], at, False, s, at, False) == WAIT
    assert stream_match(date, p[:at + 1], at, True, s, at, False) == 1
    # no rule covers the byte, or the values differ in length: not hidden
    assert stream_match(date, b"X: 1\r\n", 3, False, b"X: 2\r\n", 3, False) is None
    assert stream_match(date, p, at, False, s.replace(b"Wed 2", b"Wed 22"), at, False) is None


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


def test_dns_ttl_rule_hides_every_ttl_and_nothing_else():
    rule = parse_rule("dns.ttl")
    p = udp_frame(dns_l4(answers=2, ttls=(300, 60))[8:], sport=53)
    s = udp_frame(dns_l4(answers=2, ttls=(299, 59))[8:], sport=53)
    c, events = run([(P, p, 0), (S, s, 1)], ignore=(rule,))
    assert out_frames(events) == [p] and c.stats.ignored == {"dns.ttl": 1}
    # the address of an answer is not a TTL
    other = bytearray(dns_l4(answers=2, ttls=(300, 60))[8:])
    other[-1] ^= 1
    _, events = run([(P, p, 0), (S, udp_frame(bytes(other), sport=53), 1)], ignore=(rule,))
    assert miscompares(events)
    # only on port 53
    p9, s9 = (udp_frame(dns_l4(ttls=(t,))[8:], sport=5300) for t in (300, 299))
    _, events = run([(P, p9, 0), (S, s9, 1)], ignore=(rule,))
    assert miscompares(events)


def test_ntp_timestamps_rule():
    def ntp(stamp: int, stratum: int = 2) -> bytes:
        return bytes([0x24, stratum, 6, 0xE9]) + bytes(12) + stamp.to_bytes(8, "big") * 4
    rule = parse_rule("ntp.timestamps")
    p, s = udp_frame(ntp(1), sport=123, dport=123), udp_frame(ntp(2), sport=123, dport=123)
    _, events = run([(P, p, 0), (S, s, 1)], ignore=(rule,))
    assert out_frames(events) == [p]
    s = udp_frame(ntp(2, stratum=3), sport=123, dport=123)
    _, events = run([(P, p, 0), (S, s, 1)], ignore=(rule,))
    assert miscompares(events)


def segments(stream: bytes, cuts, seq=1000):
    """TCP frames carrying ``stream`` cut at the offsets ``cuts``."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(stream))), len(stream)]
    return [tcp_frame(stream[a:b], seq=seq + a, ack=1) for a, b in zip(bounds, bounds[1:])]


HEADERS_P = (b"HTTP/1.1 200 OK\r\nDate: Wed, 25 Nov 2026 20:00:00 GMT\r\n"
             b"X-Request-Id: 7f3a19\r\nContent-Length: 5\r\n\r\nhello")
HEADERS_S = HEADERS_P.replace(b"20:00:00", b"20:00:07").replace(b"7f3a19", b"c0ffee")
RULES = (parse_rule("http.date"), parse_rule("http.header:X-Request-Id"))


def test_header_rules_hide_values_split_across_segments_anywhere():
    """The documented limit of per-segment masking is gone: values and names
    split at any byte, differently on the two sides, are hidden."""
    for cut in range(1, len(HEADERS_P)):
        p = segments(HEADERS_P, [cut])
        s = segments(HEADERS_S, [len(HEADERS_S) - cut])
        script = [(P, f, i) for i, f in enumerate(p)] + [(S, f, 10 + i) for i, f in enumerate(s)]
        _, events = run(script, ignore=RULES)
        assert not miscompares(events), cut
        assert out_frames(events) == p, cut


def test_a_value_at_the_end_of_what_was_sent_waits_for_the_rest():
    head = HEADERS_P.index(b"20:00:00") + 8
    p = segments(HEADERS_P, [head])
    s = segments(HEADERS_S, [head])
    # the secondary's first segment ends inside the Date value: its last
    # byte might not be the value's last, so nothing past its start leaves
    _, events = run([(P, p[0], 0), (S, s[0], 1)], ignore=RULES)
    assert not miscompares(events) and out_frames(events) == []
    _, events = run([(P, p[0], 0), (S, s[0], 1), (P, p[1], 2), (S, s[1], 3)], ignore=RULES)
    assert not miscompares(events) and out_frames(events) == p
    # a longer value on one side is still a divergence
    s_long = segments(HEADERS_S.replace(b"c0ffee", b"c0ffee0"), [head])
    _, events = run([(P, p[0], 0), (S, s_long[0], 1), (P, p[1], 2), (S, s_long[1], 3)], ignore=RULES)
    assert miscompares(events)


@settings(max_examples=60, deadline=None)
@given(p_cuts=st.lists(st.integers(1, len(HEADERS_P) - 1), max_size=6),
       s_cuts=st.lists(st.integers(1, len(HEADERS_S) - 1), max_size=6),
       order=st.randoms(use_true_random=False))
def test_header_rules_do_not_depend_on_segmentation_or_interleaving(p_cuts, s_cuts, order):
    p = segments(HEADERS_P, p_cuts)
    s = segments(HEADERS_S, s_cuts)
    items = [(P, f) for f in p] + [(S, f) for f in s]
    # any interleaving that keeps each side's own order
    order.shuffle(items)
    p_iter, s_iter = iter(p), iter(s)
    script = [(side, next(p_iter) if side == P else next(s_iter), t)
              for t, (side, _f) in enumerate(items)]
    _, events = run(script, ignore=RULES)
    assert not miscompares(events) and out_frames(events) == p
    # and a planted difference outside the values is still found, at its offset
    bad = HEADERS_S.replace(b"hello", b"hellO")
    s = segments(bad, s_cuts)
    s_iter = iter(s)
    script = [(P, f, t) for t, f in enumerate(p)] + [(S, f, 100 + t) for t, f in enumerate(s)]
    _, events = run(script, ignore=RULES)
    assert [m.stream_offset for m in miscompares(events)] == [len(HEADERS_P) - 1]


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
    # a field rule where one field explains the differences: the header by
    # its name, not a regular expression on a port
    assert set(rules) == {"dns.id", "http.date", "http.header:X-Request-Id"}
    assert rules["http.header:X-Request-Id"]["example"] == (
        'tcp 10.0.0.1:81 > 10.0.0.2:80: HTTP response header X-Request-Id: "7f3a" vs "9c1b"')
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


def test_learn_noise_suggests_a_field_rule_when_one_field_explains_the_differences(tmp_path, capsys):
    """TTLs that count down differently are one field (dns.ttl), not a byte
    range that happens to cover this sample's TTL bytes."""
    p = [udp_frame(dns_l4(answers=2, ttls=(300 - i, 60))[8:], sport=53, dport=41000 + i)
         for i in range(3)]
    s = [udp_frame(dns_l4(answers=2, ttls=(290 - i, 59 - i))[8:], sport=53, dport=41000 + i)
         for i in range(3)]
    write(tmp_path / "p.pcap", p)
    write(tmp_path / "s.pcap", s)
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(tmp_path / "p.pcap"), str(tmp_path / "s.pcap"), "--learn-noise",
              "--json", "--no-timeout"])
    doc = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0
    assert [r["rule"] for r in doc["rules"]] == ["dns.ttl"]
    assert doc["rules"][0]["explains_miscompares"] == 3
    assert doc["rules"][0]["example"] == ("udp 10.0.0.1:53 > 10.0.0.2:41000: DNS answer 1 "
                                          "example.org A: TTL 300 vs 290 (and 1 more field)")
    assert doc["checkpoint_requests"] == {"before": 3, "after": 0}
