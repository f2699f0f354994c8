"""Property tests for the invariants of the design (design/architecture.md §4):

1. every primary frame leaves exactly once (released or bypassed), never a
   secondary frame;
2. per connection, primary frames leave in the order the primary sent them
   (TCP: sequence order);
3. without timeouts, the decisions do not depend on how the two streams
   interleave;
4. memory is bounded by configuration, whatever the input.
"""

from hypothesis import HealthCheck, given, settings, strategies as st

from colo_cli.core import (PRIMARY, SECONDARY, Bypassed, Comparator, Config, Matched,
                           Miscompare, Released)
from colo_cli.testing import arp_frame, ether, icmp_frame, ipv4, tcp_frame, udp, udp_frame
from scripts import interleave


def fragments(l4: bytes, ident: int, pieces: int) -> list:
    """``l4`` in IPv4 fragments of 8-byte multiples."""
    size = max(8, (len(l4) // pieces) // 8 * 8)
    out, off = [], 0
    while off < len(l4):
        piece = l4[off:off + size]
        more = 0x2000 if off + len(piece) < len(l4) else 0
        out.append(ether(ipv4(piece, 17, ident=ident, flags_frag=more | (off // 8)), 0x0800))
        off += len(piece)
    return out

SETTINGS = settings(max_examples=int(__import__("os").environ.get("COLO_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- generating two replicas' output -------------------------------------------------

@st.composite
def udp_flow(draw, n):
    sport = n * 1000 + draw(st.integers(1, 999))     # one flow, one 4-tuple
    payloads = draw(st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=8))
    return [udp_frame(b"%d:" % n + p, sport=sport) for p in payloads]


@st.composite
def tcp_flow(draw, n):
    """An in-order TCP stream (optional handshake and FIN), as a list of
    (payload, flags) segments."""
    sport = n * 1000 + draw(st.integers(1, 999))     # one flow, one 4-tuple
    isn = draw(st.integers(0, 0xFFFFFFFF))
    ack = draw(st.integers(0, 0xFFFFFFFF))
    data = draw(st.binary(min_size=1, max_size=600))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6))))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)]) if b > a]
    frames = []
    seq = isn
    if draw(st.booleans()):
        frames.append(tcp_frame(b"", seq=seq, ack=ack, flags=0x12, sport=sport))
        seq = (seq + 1) & 0xFFFFFFFF
    for piece in pieces:
        frames.append(tcp_frame(piece, seq=seq, ack=ack, flags=0x18, sport=sport))
        seq = (seq + len(piece)) & 0xFFFFFFFF
        if draw(st.booleans()):
            ack = (ack + draw(st.integers(0, 100))) & 0xFFFFFFFF
            frames.append(tcp_frame(b"", seq=seq, ack=ack, flags=0x10, sport=sport))
    if draw(st.booleans()):
        frames.append(tcp_frame(b"", seq=seq, ack=ack, flags=0x11, sport=sport))
    return frames, (sport, isn, data)


@st.composite
def flow_pair(draw, n, mutate):
    """(primary frames, secondary frames) of one flow; the secondary is an
    identical replica or, with ``mutate``, one that differs."""
    kind = draw(st.sampled_from(["udp", "tcp", "icmp", "arp", "junk", "frag"]))
    if kind == "udp":
        p = draw(udp_flow(n))
    elif kind == "tcp":
        p, (sport, isn, data) = draw(tcp_flow(n))
    elif kind == "icmp":
        p = [icmp_frame(b"%d" % n, ident=n, seq=i) for i in range(draw(st.integers(1, 4)))]
    elif kind == "arp":
        p = [arp_frame(spa="10.9.%d.%d" % (n // 250, n % 250 + 1))]
    elif kind == "frag":
        # one UDP datagram in IPv4 fragments; the secondary uses its own IP ID
        # and may cut it differently
        dgram = udp(b"%d:" % n + draw(st.binary(min_size=20, max_size=120)), sport=n * 1000 + 1)
        p = fragments(dgram, n + 1, draw(st.integers(1, 4)))
        s_frags = fragments(dgram, n + 500, draw(st.integers(1, 4)))
    else:
        p = [draw(st.binary(max_size=80))]
    s = list(p) if kind != "frag" else s_frags
    if mutate and draw(st.booleans()):
        how = draw(st.sampled_from(["flip", "drop", "extra", "resegment"]))
        i = draw(st.integers(0, len(s) - 1))
        if how == "flip" and s[i]:
            f = bytearray(s[i])
            f[draw(st.integers(0, len(f) - 1))] ^= 0xFF
            s[i] = bytes(f)
        elif how == "drop":
            del s[i]
        elif how == "extra":
            s.insert(i, s[i])
        elif how == "resegment" and kind == "tcp":
            # the secondary sends the same bytes in one segment
            s = [f for f in s if len(f) <= 54] + [tcp_frame(data, seq=(isn + (1 if len(p) and p[0][47] & 2 else 0)) & 0xFFFFFFFF,
                                                           ack=0, flags=0x18, sport=sport)]
    return p, s


@st.composite
def replicas(draw, mutate=True, max_flows=6):
    """Per-side frame sequences: flows interleaved at random within a side
    (each flow keeps its own order)."""
    nflows = draw(st.integers(1, max_flows))
    pairs = [draw(flow_pair(n, mutate)) for n in range(nflows)]
    return interleave(draw, [p for p, _ in pairs]), interleave(draw, [s for _, s in pairs])


@st.composite
def interleaving(draw, primary, secondary, extras=True):
    """A script: both sides' frames in their own order, interleaved at
    random, with timer ticks and checkpoints sprinkled in when ``extras``."""
    p, s = list(primary), list(secondary)
    script, now = [], 0
    while p or s:
        now += draw(st.integers(0, 400))
        choices = (["p"] if p else []) + (["s"] if s else [])
        if extras:
            choices += ["timer", "checkpoint", "resolve"] if draw(st.integers(0, 9)) == 0 else []
        c = draw(st.sampled_from(choices))
        if c == "p":
            script.append((PRIMARY, p.pop(0), now))
        elif c == "s":
            script.append((SECONDARY, s.pop(0), now))
        else:
            script.append((c, now))
    return script


def execute(script, config, check_bounds=True, compact=False):
    c = Comparator(config, compact=compact)
    events = []
    now = 0
    for item in script:
        if item[0] == "timer":
            now = item[1]
            while c.get_timer() is not None and c.get_timer() <= now:
                events += c.handle_timer(c.get_timer())
        elif item[0] == "checkpoint":
            now = item[1]
            events += c.checkpoint(now)
        elif item[0] == "resolve":
            # what replay and serve's release policy do with a request: the
            # connection concerned only (the first one with frames queued)
            now = item[1]
            queued = [conn for conn in c.table if conn.queued]
            if queued:
                events += c.checkpoint_connection(queued[0].key, now)
        else:
            side, frame, now = item
            events += c.receive(side, frame, now)
        if check_bounds:
            assert_bounded(c, config)
    events += c.finish(now)
    return c, events


def assert_bounded(c, config):
    assert len(c.table) <= config.max_connections
    assert c.queued_bytes <= config.max_queued_bytes
    for conn in c.table:
        assert len(conn.primary_queue) <= config.max_queue_size
        assert len(conn.secondary_queue) <= config.max_queue_size
    assert len(c._held_arrivals()) <= c.queued_frames + (c.queued_frames >> 2) + 1024 + 1


# -- the invariants ---------------------------------------------------------------

@SETTINGS
@given(st.data())
def test_every_primary_frame_leaves_exactly_once_never_a_secondary(data):
    primary, secondary = data.draw(replicas())
    script = data.draw(interleaving(primary, secondary))
    config = Config(compare_timeout_ms=data.draw(st.sampled_from([None, 500, 3000])),
                    expired_scan_cycle_ms=100,
                    max_queue_size=data.draw(st.integers(1, 8)),
                    max_connections=data.draw(st.integers(1, 8)),
                    max_queued_bytes=data.draw(st.integers(60, 5000)))
    c, events = execute(script, config)
    out = [e.packet for e in events if isinstance(e, (Released, Bypassed))]
    assert all(p.side == PRIMARY for p in out)
    assert sorted(p.index for p in out) == list(range(len(primary)))
    assert [p.data for p in sorted(out, key=lambda p: p.index)] == primary
    assert c.queued_frames == 0 and c.queued_bytes == 0
    # every secondary frame is accounted for too
    st_ = c.stats
    assert (st_.secondary_matched + st_.secondary_absorbed + st_.secondary_discarded
            + sum(n for k, n in st_.dropped.items() if k.startswith("secondary:"))) == len(secondary)


@SETTINGS
@given(st.data())
def test_per_connection_order(data):
    primary, secondary = data.draw(replicas(mutate=True))
    script = data.draw(interleaving(primary, secondary))
    config = Config(compare_timeout_ms=500, expired_scan_cycle_ms=100,
                    max_queue_size=data.draw(st.integers(1, 6)), max_connections=4)
    _, events = execute(script, config)
    last_index = {}
    for e in events:
        if isinstance(e, Released):
            key = e.packet.key
            # generated TCP flows are sent in sequence order, so sequence order
            # and the primary's order agree
            assert e.packet.index > last_index.get(key, -1), key
            last_index[key] = e.packet.index


def decisions(events):
    """What was decided, independent of timing: which primary frames were
    released on a match, and where each miscompare was found."""
    matched = sorted(e.packet.index for e in events if isinstance(e, Released) and e.reason == "match")
    found = sorted((e.key, e.cause, e.stream_offset, e.datagram_index)
                   for e in events if isinstance(e, Miscompare))
    return matched, found


@SETTINGS
@given(st.data())
def test_decisions_do_not_depend_on_interleaving(data):
    primary, secondary = data.draw(replicas(mutate=True))
    config = Config(compare_timeout_ms=None, max_queue_size=10_000, max_connections=10_000,
                    max_queued_bytes=1 << 30)
    one = data.draw(interleaving(primary, secondary, extras=False))
    two = data.draw(interleaving(primary, secondary, extras=False))
    assert decisions(execute(one, config)[1]) == decisions(execute(two, config)[1]), \
        describe(one) + "\n---\n" + describe(two)


def describe(script) -> str:
    """A readable form of a script for failure messages."""
    from colo_cli.core.packet import KIND_TCP, parse
    from colo_cli.flows import format_key
    lines = []
    for item in script:
        if isinstance(item[0], str):
            lines.append(f"{item[0]} {item[1]}")
            continue
        side, frame, now = item
        r = parse(frame)
        who = "P" if side == PRIMARY else "S"
        if r[0] is None:
            lines.append(f"{who} {now} not comparable ({r[1]})")
        elif r[0] == KIND_TCP:
            lines.append(f"{who} {now} {format_key(r[1])} seq={r[4]} ack={r[5]} flags={r[6]:#x} "
                         f"payload={frame[r[2]:r[3]]!r}")
        else:
            lines.append(f"{who} {now} {format_key(r[1])} {frame[r[2]:r[3]]!r}")
    return "\n".join(lines)


@SETTINGS
@given(st.data())
def test_identical_replicas_match_completely(data):
    primary, secondary = data.draw(replicas(mutate=False))
    script = data.draw(interleaving(primary, secondary, extras=False))
    config = Config(compare_timeout_ms=None, max_queue_size=10_000)
    c, events = execute(script, config)
    assert not [e for e in events if isinstance(e, Miscompare)]
    leftovers = [e for e in events if isinstance(e, Released) and e.reason != "match"]
    assert leftovers == [], leftovers


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=120)), max_size=60),
       st.integers(1, 5), st.integers(1, 5), st.integers(100, 2000))
def test_memory_bounded_on_hostile_input(frames, qsize, nconn, nbytes):
    config = Config(max_queue_size=qsize, max_connections=nconn, max_queued_bytes=nbytes,
                    compare_timeout_ms=100, expired_scan_cycle_ms=10)
    c = Comparator(config)
    for i, (side, frame) in enumerate(frames):
        # make most frames parse: glue random bytes behind valid headers
        if i % 2:
            frame = udp_frame(frame, sport=i % 7)
        c.receive(PRIMARY if side else SECONDARY, frame, i * 7)
        c.handle_timer(i * 7)
        assert_bounded(c, config)


def _outcome(events):
    """Every decision, in order: what left (and why), what diverged, what
    was asked for."""
    out = []
    for e in events:
        if isinstance(e, Matched):
            out.append(("released", e.data, "match"))
        elif isinstance(e, (Released, Bypassed)):
            out.append(("released", e.packet.data, getattr(e, "reason", "bypass")))
        elif isinstance(e, Miscompare):
            out.append(("miscompare", e.key, e.cause, e.stream_offset, e.datagram_index))
        else:
            out.append((type(e).__name__, getattr(e, "cause", None)))
    return out


@SETTINGS
@given(st.data())
def test_compact_output_decides_exactly_as_the_full_events(data):
    """``Matched`` events (what the adapters use) stand for exactly the
    ``Released(..., match)`` events, in the same places: nothing else may
    differ, whatever the limits, timers and checkpoints do."""
    primary, secondary = data.draw(replicas())
    script = data.draw(interleaving(primary, secondary))
    config = Config(compare_timeout_ms=500, expired_scan_cycle_ms=100,
                    max_queue_size=data.draw(st.integers(1, 8)),
                    max_connections=data.draw(st.integers(1, 8)),
                    max_queued_bytes=data.draw(st.integers(60, 5000)))
    full = _outcome(execute(script, config)[1])
    assert _outcome(execute(script, config, compact=True)[1]) == full
