"""--normalize-seq: replicas whose TCP stacks chose their own initial
sequence numbers (two instances of a service, or COLO without
filter-rewriter) compared in relative sequence space."""

import pytest

from colo_cli.core import Config
from colo_cli.core.compare import SeqNormalizer
from colo_cli.testing import tcp_frame

from scripts import P, S, miscompares, out_frames, requests, run

SYN, ACK, PA, FA = 0x02, 0x10, 0x18, 0x11
BODY = bytes(range(256)) * 16      # 4096 bytes


def server_side(isn, client_isn, body=BODY, seg=1448, extra_acks=False, ttl=64):
    """What a guest web server sends: SYN-ACK, the response in segments of
    ``seg`` bytes, FIN; acks of the client's 100-byte request."""
    c = client_isn + 1
    out = [tcp_frame(b"", seq=isn, ack=c, flags=SYN | ACK, ttl=ttl)]
    c += 100                                   # the request arrived
    out.append(tcp_frame(b"", seq=isn + 1, ack=c, flags=ACK, ttl=ttl))
    if extra_acks:
        out.append(tcp_frame(b"", seq=isn + 1, ack=c, flags=ACK, window=1000, ttl=ttl))
    pos = 0
    while pos < len(body):
        piece = body[pos:pos + seg]
        out.append(tcp_frame(piece, seq=(isn + 1 + pos) & 0xFFFFFFFF, ack=c, flags=PA, ttl=ttl))
        pos += len(piece)
    out.append(tcp_frame(b"", seq=(isn + 1 + pos) & 0xFFFFFFFF, ack=c, flags=FA, ttl=ttl))
    return out


def pair_script(p_frames, s_frames):
    script = []
    for i in range(max(len(p_frames), len(s_frames))):
        if i < len(p_frames):
            script.append((P, p_frames[i], 2 * i))
        if i < len(s_frames):
            script.append((S, s_frames[i], 2 * i + 1))
    return script


def test_independent_isns_and_segmentation_match_when_normalized():
    p = server_side(isn=1_000_000, client_isn=555)
    s = server_side(isn=3_900_000_000, client_isn=77_777, seg=536, extra_acks=True, ttl=63)
    _, events = run(pair_script(p, s), normalize_seq=True)
    assert out_frames(events) == p
    assert requests(events) == [] and miscompares(events) == []


def test_without_normalization_the_same_pair_does_not_match():
    # the default compares sequence numbers as they are (as with QEMU's
    # filter-rewriter in front): different ISNs are different streams
    p = server_side(isn=1_000_000, client_isn=555)
    s = server_side(isn=3_900_000_000, client_isn=77_777)
    _, events = run(pair_script(p, s) + [("timer", 10_000)])
    assert requests(events)


def test_gso_super_frame_against_mtu_segments():
    p = server_side(isn=42, client_isn=1, seg=4096)          # one GSO frame
    s = server_side(isn=4_000_000_000, client_isn=2, seg=1448)
    _, events = run(pair_script(p, s), normalize_seq=True)
    assert out_frames(events) == p and not miscompares(events)


def test_one_differing_byte_reported_at_its_relative_offset_with_the_primary_seq():
    bad = bytearray(BODY)
    bad[3000] ^= 0xFF
    p = server_side(isn=0xFFFFF000, client_isn=9)            # wraps during the body
    s = server_side(isn=123_456, client_isn=8, body=bytes(bad), seg=1000)
    _, events = run(pair_script(p, s), normalize_seq=True)
    (m,) = miscompares(events)
    assert m.stream_offset == 3000
    assert m.raw_seq == (0xFFFFF000 + 1 + 3000) & 0xFFFFFFFF
    assert m.primary.data[m.primary_offset] != m.secondary.data[m.secondary_offset]


def test_active_open_guest_as_client():
    # the guest connects out: its SYN, then the handshake's ACK acknowledges
    # the server's ISN, which differs between the two replicas' servers
    def client(isn, server_isn):
        return [tcp_frame(b"", seq=isn, ack=0, flags=SYN, sport=50000, dport=80),
                tcp_frame(b"", seq=isn + 1, ack=server_isn + 1, flags=ACK, sport=50000, dport=80),
                tcp_frame(b"GET / HTTP/1.1\r\n\r\n", seq=isn + 1, ack=server_isn + 1, flags=PA,
                          sport=50000, dport=80),
                tcp_frame(b"", seq=isn + 19, ack=server_isn + 1 + 500, flags=ACK,
                          sport=50000, dport=80)]
    p, s = client(10, 7_000), client(2_000_000_000, 99_999_999)
    _, events = run(pair_script(p, s), normalize_seq=True)
    assert out_frames(events) == p and not miscompares(events)


@pytest.mark.parametrize("p_isn, s_isn", [(0xFFFFF000, 5_000), (5_000, 0xFFFFFFFF),
                                           (0xFFFFFA00, 0xFFFFF800)])
def test_sequence_numbers_wrapping_mid_stream(p_isn, s_isn):
    """One replica's (or both replicas') sequence numbers pass 2**32 in the
    middle of the response, each at its own place: the streams still line
    up, and a byte changed after the wrap is found at its relative offset."""
    p = server_side(isn=p_isn, client_isn=1)
    s = server_side(isn=s_isn, client_isn=77, seg=1000)
    _, events = run(pair_script(p, s), normalize_seq=True)
    assert out_frames(events) == p and not miscompares(events)
    body = bytearray(BODY)
    body[3000] ^= 0xFF
    s = server_side(isn=s_isn, client_isn=77, seg=1000, body=bytes(body))
    _, events = run(pair_script(p, s), normalize_seq=True)
    (m,) = miscompares(events)
    assert m.stream_offset == 3000
    assert m.raw_seq == (p_isn + 1 + 3000) & 0xFFFFFFFF


def test_missing_handshake_uses_the_first_segments():
    p = server_side(isn=5_000, client_isn=1)[2:]              # no SYN-ACK, no first ACK
    s = server_side(isn=800_000, client_isn=1, seg=700)[2:]
    _, events = run(pair_script(p, s), normalize_seq=True)
    assert out_frames(events) == p and not miscompares(events)


def test_retransmission_from_before_the_first_seen_segment():
    # a capture that starts mid-stream, then a retransmission of a segment
    # sent before it: it falls before relative 0 ("across the ISN")
    p_frames = server_side(isn=5_000, client_isn=1)
    s_frames = server_side(isn=70_000, client_isn=1)
    p = p_frames[3:] + [p_frames[2]]
    s = s_frames[3:] + [s_frames[2]]
    _, events = run(pair_script(p, s), normalize_seq=True)
    assert sorted(out_frames(events)) == sorted(p) and not miscompares(events)


def test_ack_gate_works_in_relative_space():
    # the primary acks 100 bytes of request the secondary has not acked yet
    p = [tcp_frame(b"", seq=10, ack=1001, flags=SYN | ACK), tcp_frame(b"x", seq=11, ack=1101, flags=PA)]
    s = [tcp_frame(b"", seq=50, ack=8001, flags=SYN | ACK), tcp_frame(b"x", seq=51, ack=8001, flags=PA)]
    _, events = run(pair_script(p, s), normalize_seq=True)
    assert out_frames(events) == p[:1]                         # data held by the gate
    _, events = run(pair_script(p, s) + [(S, tcp_frame(b"", seq=52, ack=8101, flags=ACK), 10)],
                    normalize_seq=True)
    assert out_frames(events) == p


def test_normalizer_unit():
    n = SeqNormalizer()

    def Seg(seq, ack, flags):
        # the fields the normalizer reads and rewrites, on a real Packet (the
        # compiled core takes nothing else)
        from colo_cli.core.packet import Packet
        pkt = Packet(0, b"", 0, 0, 0.0, 0)
        pkt.seq, pkt.ack, pkt.flags = seq, ack, flags
        return pkt
    syn = Seg(0xFFFFFFFF, 500, SYN | ACK)
    n.apply(0, syn)
    assert (syn.seq, syn.ack) == (0xFFFFFFFF, 0)                # SYN at -1, ack origin
    data = Seg(0, 600, PA)                                       # ISN+1 wrapped to 0
    n.apply(0, data)
    assert (data.seq, data.ack) == (0, 100)
    assert n.raw_seq(0, 5) == 5 and n.raw_seq(1, 5) is None
    rst = Seg(12345, 0, 0x04)
    n.apply(1, rst)
    assert rst.seq == 12345 and n.seq_origin[1] is None         # an RST teaches nothing


@pytest.mark.parametrize("flag", ["--normalize-seq"])
def test_replay_option(tmp_path, capsys, flag):
    from colo_cli.capture import PcapWriter
    from colo_cli.cli import main
    p = server_side(isn=1_000_000, client_isn=555)
    s = server_side(isn=3_900_000_000, client_isn=77_777, seg=536)
    for name, frames in (("p", p), ("s", s)):
        with open(tmp_path / f"{name}.pcap", "wb") as f:
            w = PcapWriter(f)
            for i, fr in enumerate(frames):
                w.write(i * 1000, fr)
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(tmp_path / "p.pcap"), str(tmp_path / "s.pcap"), "-q"])
    assert exc.value.code == 1
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(tmp_path / "p.pcap"), str(tmp_path / "s.pcap"), "-q", flag])
    assert exc.value.code == 0


def test_config_default_is_off():
    assert Config().normalize_seq is False
