"""Divergences explained in protocol terms (colo_cli.explain): the examples'
changes field by field, one-byte changes in every field of every decoded
protocol, detection by port and by content, and malformed payloads, which
must never raise."""

import random
import struct

import pytest

from colo_cli.capture import open_capture
from colo_cli.explain import explain
from colo_cli.replay import replay
from colo_cli.testing import ether, icmp_frame, ipv4, ipv6, tcp_frame, udp_frame

from scripts import P, S, miscompares, run

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"


def the_miscompare(p_frames, s_frames, **config):
    _, events = run([(P, f, i) for i, f in enumerate(p_frames)]
                    + [(S, f, 100 + i) for i, f in enumerate(s_frames)], **config)
    found = miscompares(events)
    assert found, "the frames were expected to miscompare"
    return found[0]


def udp_pair(p_payload, s_payload, sport=53, dport=40000):
    return the_miscompare([udp_frame(p_payload, sport=sport, dport=dport)],
                          [udp_frame(s_payload, sport=sport, dport=dport)])


def dns(txid=0x1a2b, ttl=300, addr=b"\xc0\x00\x02\x0a", rcode=0, name=b"\x07example\x03org\x00",
        extra=b""):
    return (struct.pack(">HHHHHH", txid, 0x8180 | rcode, 1, 1, 0, 0) + name + b"\x00\x01\x00\x01"
            + b"\xc0\x0c\x00\x01\x00\x01" + struct.pack(">I", ttl) + b"\x00\x04" + addr + extra)


# -- the examples --------------------------------------------------------------------

def test_the_diverging_examples_are_explained_field_by_field():
    with open_capture(str(EXAMPLES / "diverge-primary.pcap")) as p, \
            open_capture(str(EXAMPLES / "diverge-secondary.pcap")) as s:
        result = replay(p, s)
    http, dns_ = (explain(r.event) for r in result.miscompares)
    assert http.text == ('HTTP response header Date: "Wed, 25 Nov 2026 20:00:00 GMT" '
                         'vs "...20:00:01 GMT"')
    assert http.to_json()["field"] == "headers.Date" and http.rule == "http.date"
    assert (http.first.primary, http.first.secondary) == ("Wed, 25 Nov 2026 20:00:00 GMT",
                                                         "Wed, 25 Nov 2026 20:00:01 GMT")
    assert dns_.text == "DNS answer 1 example.org A: TTL 300 vs 299"
    assert dns_.to_json() | {"fields": None} == {
        "protocol": "dns", "field": "answers[0].ttl", "primary": 300, "secondary": 299,
        "text": "DNS answer 1 example.org A: TTL 300 vs 299", "rule": "dns.ttl",
        "fields": None, "fields_truncated": False}


# -- DNS -----------------------------------------------------------------------------

@pytest.mark.parametrize("changed, path, text", [
    (dns(txid=0x1a2c), "id", "DNS header: ID 0x1a2b vs 0x1a2c"),
    (dns(rcode=3), "flags.rcode", "DNS header: rcode NOERROR vs NXDOMAIN"),
    (dns()[:2] + b"\x01" + dns()[3:], "flags.qr", "DNS header: QR response vs query"),
    (dns(addr=b"\xc0\x00\x02\x0b"), "answers[0].data",
     'DNS answer 1 example.org A: data "192.0.2.10" vs "192.0.2.11"'),
    (dns(name=b"\x07example\x03net\x00"), "questions[0].name",
     'DNS question 1 example.org A: name "example.org" vs "example.net"'),
])
def test_dns_fields(changed, path, text):
    e = explain(udp_pair(dns(), changed))
    assert e.protocol == "dns" and e.first.path == path
    assert e.first.text == text


def test_dns_extra_record_is_a_count_and_a_record():
    more = dns().replace(b"\x00\x01\x00\x00\x00\x00", b"\x00\x01\x00\x00\x00\x01", 1) + \
        b"\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00"
    e = explain(udp_pair(dns(), more))
    assert [d.path for d in e.differences] == ["counts.additional", "additional[0].type",
                                               "additional[0].udp_size", "additional[0].edns_flags",
                                               "additional[0].data"]
    assert e.rule is None


def test_dns_record_type_dpkt_does_not_know_keeps_its_bytes():
    https = lambda b: (struct.pack(">HHHHHH", 1, 0x8180, 1, 1, 0, 0) + b"\x07example\x03org\x00"
                       + b"\x00\x41\x00\x01\xc0\x0c\x00\x41\x00\x01" + struct.pack(">IH", 60, 3)
                       + bytes([0, 1, b]))
    e = explain(udp_pair(https(0), https(1)))
    assert e.first.path == "answers[0].data" and e.first.offset == 2


def test_dns_one_byte_anywhere_is_named_or_refused_and_never_raises():
    base = dns()
    named = 0
    for i in range(len(base)):
        for bit in (0x01, 0x80):
            changed = bytearray(base)
            changed[i] ^= bit
            e = explain(udp_pair(base, bytes(changed)))
            if e is None:
                continue
            assert e.protocol == "dns" and e.differences
            named += 1
    assert named >= len(base)          # most flips are named fields


def test_dns_detected_by_content_on_another_port():
    e = explain(udp_pair(dns(), dns(ttl=299), sport=5300, dport=40000))
    assert e is not None and e.first.path == "answers[0].ttl"


# -- NTP, DHCP -----------------------------------------------------------------------

def ntp(transmit=0xE9A1B2C3_00000000, stratum=2):
    return (bytes([0x24, stratum, 6, 0xE9]) + struct.pack(">II", 0x100, 0x200) + b"GPS\0"
            + struct.pack(">QQQQ", 0xE9A1B2C0_00000000, 0, 0xE9A1B2C3_00000000, transmit))


def test_ntp_fields():
    e = explain(udp_pair(ntp(), ntp(transmit=0xE9A1B2C3_80000000), sport=123, dport=123))
    assert e.protocol == "ntp" and e.first.path == "transmit_timestamp" and e.rule == "ntp.timestamps"
    assert e.first.text == ("NTP: transmit timestamp 2024-03-17T18:19:47.000000Z vs "
                            "2024-03-17T18:19:47.500000Z")
    e = explain(udp_pair(ntp(), ntp(stratum=3), sport=123, dport=123))
    assert e.first.text == "NTP: stratum 2 vs 3" and e.rule is None


def dhcp(yiaddr="192.0.2.50", lease=3600, msgtype=5):
    head = struct.pack(">BBBBIHHIIII", 2, 1, 6, 0, 0xCAFE, 0, 0, 0,
                       int.from_bytes(bytes(map(int, yiaddr.split("."))), "big"), 0, 0)
    head += bytes.fromhex("525400000001") + bytes(10) + bytes(64) + bytes(128)
    opts = bytes([53, 1, msgtype, 51, 4]) + lease.to_bytes(4, "big") + bytes([255])
    return head + b"\x63\x82\x53\x63" + opts


def test_dhcp_fields_by_port_and_by_content():
    e = explain(udp_pair(dhcp(), dhcp(lease=7200), sport=67, dport=68))
    assert e.protocol == "dhcp" and e.first.text == "DHCP option 51 (lease time): 3,600 s vs 7,200 s"
    e = explain(udp_pair(dhcp(), dhcp(yiaddr="192.0.2.51"), sport=6767, dport=6868))
    assert e.first.path == "yiaddr" and e.first.text == 'DHCP: your address "192.0.2.50" vs "192.0.2.51"'
    e = explain(udp_pair(dhcp(), dhcp(msgtype=6), sport=67, dport=68))
    assert e.first.text == "DHCP option 53 (message type): ACK vs NAK"


def test_udp_checksum_alone():
    p = udp_frame(b"same payload", sport=9, dport=9)
    s = bytearray(p)
    s[40] ^= 0xFF                        # the UDP checksum
    e = explain(the_miscompare([p], [bytes(s)]))
    assert e.protocol == "udp" and e.first.path == "checksum" and e.rule == "udp.checksum"


# -- ICMP ----------------------------------------------------------------------------

def test_icmp_echo_fields():
    e = explain(the_miscompare([icmp_frame(b"abcdefgh", ident=7, seq=1)],
                               [icmp_frame(b"abcdXfgh", ident=7, seq=1)]))
    assert e.protocol == "icmp" and e.first.path == "data" and e.first.offset == 4
    assert e.first.text == 'ICMP echo reply: data differs at byte 4: "efgh" vs "Xfgh"'
    e = explain(the_miscompare([icmp_frame(b"abcdefgh", ident=7, seq=1)],
                               [icmp_frame(b"abcdefgh", ident=7, seq=2)]))
    assert e.texts == ["ICMP echo reply: sequence number 1 vs 2"]


def test_icmpv6_type():
    def v6(t):
        msg = bytes([t, 0, 0, 0]) + bytes(20)
        return ether(ipv6(msg, 58, "2001:db8::1", "2001:db8::2"), 0x86DD)
    e = explain(the_miscompare([v6(1)], [v6(3)]))
    assert e.protocol == "icmp" and e.first.text == \
        "ICMPv6: type 1 (destination unreachable) vs 3 (time exceeded)"


# -- HTTP and TLS over TCP -------------------------------------------------------------

RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: x\r\nETag: \"abc\"\r\nContent-Length: 11\r\n\r\n"
            b"hello world")


def tcp_pair(p_stream, s_stream, port=80, p_cut=None, s_cut=None):
    def frames(stream, cut):
        cuts = [0, cut, len(stream)] if cut else [0, len(stream)]
        return [tcp_frame(stream[a:b], seq=1000 + a, ack=1, sport=port, dport=50000)
                for a, b in zip(cuts, cuts[1:])]
    return the_miscompare(frames(p_stream, p_cut), frames(s_stream, s_cut))


def test_http_header_body_and_status_line():
    e = explain(tcp_pair(RESPONSE, RESPONSE.replace(b'"abc"', b'"abd"')))
    assert e.protocol == "http" and e.first.path == "headers.ETag"
    assert e.rule == "http.header:ETag"
    e = explain(tcp_pair(RESPONSE, RESPONSE.replace(b"world", b"World")))
    assert e.first.path == "body" and e.first.offset == 6
    assert e.first.text == 'HTTP response body (11 bytes): differs at byte 6: "world" vs "World"'
    e = explain(tcp_pair(RESPONSE, RESPONSE.replace(b"200 OK", b"500 OK")))
    assert e.first.path == "start_line.status" and e.first.text == \
        'HTTP response status line: status "200" vs "500"'


def test_http_by_content_on_8081_and_across_differently_cut_segments():
    changed = RESPONSE.replace(b'"abc"', b'"abd"')
    for p_cut, s_cut in ((5, 40), (40, 5), (None, 36), (37, None)):
        e = explain(tcp_pair(RESPONSE, changed, port=9999, p_cut=p_cut, s_cut=s_cut))
        assert e is not None and e.first.path == "headers.ETag", (p_cut, s_cut)


def test_http_request_line_and_a_header_of_another_name():
    req = b"GET /index.html HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n"
    e = explain(tcp_pair(req, req.replace(b"/index.html", b"/indeX.html"), port=5000))
    assert e.first.path == "start_line.uri"
    e = explain(tcp_pair(req, req.replace(b"X-A", b"X-B"), port=5000))
    assert e.first.path == "headers.line" and e.first.text == \
        'HTTP request header line 2: "X-A: 1" vs "X-B: 1"'


def tls_record(ctype, data, version=0x0303):
    return struct.pack(">BHH", ctype, version, len(data)) + data


def test_tls_records():
    stream = tls_record(22, b"\x02" + bytes(40)) + tls_record(23, bytes(64))
    changed = stream[:-10] + b"\x01" + stream[-9:]
    e = explain(tcp_pair(stream, changed, port=443))
    assert e.protocol == "tls" and e.first.path == "record.data"
    assert e.first.where == "TLS application_data record at stream offset 46"
    e = explain(tcp_pair(stream, stream[:46] + tls_record(21, bytes(64)), port=8443))
    assert e.first.text.startswith("TLS application_data record at stream offset 46: "
                                   "content type 23 (application_data) vs 21 (alert)")


# -- malformed payloads: never raise ---------------------------------------------------

def _flip(rng, payload):
    b = bytearray(payload)
    for _ in range(rng.randrange(1, 4)):
        if b:
            b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


@pytest.mark.parametrize("name, payload, port", [
    ("dns", dns(), 53), ("ntp", ntp(), 123), ("dhcp", dhcp(), 67),
    ("garbage", bytes(range(256)) * 2, 53)])
def test_malformed_datagrams_never_raise(name, payload, port):
    rng = random.Random(name)
    for _ in range(150):
        cut = rng.randrange(len(payload) + 1)
        a = _flip(rng, payload)[:cut] or b"x"
        b = _flip(rng, payload)[:rng.randrange(len(payload) + 1)] or b"y"
        if a == b:
            continue
        _, events = run([(P, udp_frame(a, sport=port, dport=port), 0),
                         (S, udp_frame(b, sport=port, dport=port), 1)])
        for m in miscompares(events):
            e = explain(m)                 # no exception, whatever the bytes
            assert e is None or (e.differences and e.text)


@pytest.mark.parametrize("port, stream", [(80, RESPONSE), (443, tls_record(23, bytes(80)))])
def test_malformed_streams_never_raise(port, stream):
    rng = random.Random(port)
    for _ in range(150):
        a = _flip(rng, stream)
        b = _flip(rng, stream)
        if a == b:
            continue
        _, events = run([(P, tcp_frame(a, seq=1, ack=1, sport=port), 0),
                         (S, tcp_frame(b, seq=1, ack=1, sport=port), 1)])
        for m in miscompares(events):
            e = explain(m)
            assert e is None or (e.differences and e.text)


def test_malformed_icmp_never_raises():
    rng = random.Random(1)
    for _ in range(150):
        a = bytes(rng.randrange(256) for _ in range(rng.randrange(4, 40)))
        b = bytes(rng.randrange(256) for _ in range(rng.randrange(4, 40)))
        p = ether(ipv4(a, 1, "10.0.0.1", "10.0.0.2", 1, 64), 0x0800)
        s = ether(ipv4(b, 1, "10.0.0.1", "10.0.0.2", 2, 64), 0x0800)
        for m in miscompares(run([(P, p, 0), (S, s, 1)])[1]):
            explain(m)


def test_a_decoder_bug_costs_the_explanation_only(monkeypatch):
    from colo_cli.explain import dns as dns_module

    def broken(payload):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(dns_module, "fields", broken)
    assert explain(udp_pair(dns(), dns(ttl=1))) is None


def test_a_message_that_decodes_on_one_side_only_says_so():
    e = explain(udp_pair(dns(), dns()[:20]))
    assert e.protocol == "dns" and e.first.path == "message"
    assert e.first.primary_shown == "decodes" and e.first.secondary_shown.startswith("does not decode")
