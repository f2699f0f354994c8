"""Run scripted ``(side, frame, now_ms)`` sequences through the core."""

from colo_cli.core import (PRIMARY, SECONDARY, Bypassed, CheckpointDone, CheckpointRequested,
                           Comparator, Config, Dropped, Miscompare, Released)

P, S = PRIMARY, SECONDARY


def run(script, comparator=None, **config):
    """``script`` items: ``(P|S, frame, now_ms)`` (or ``(P|S, frame, now_ms,
    "cut")`` for a frame a capture cut short), ``("timer", now_ms)``,
    ``("checkpoint", now_ms)`` or ``("finish", now_ms)``.  Returns
    ``(comparator, events)``."""
    c = comparator or Comparator(Config(**config))
    events = []
    for item in script:
        if item[0] == "timer":
            events += c.handle_timer(item[1])
        elif item[0] == "checkpoint":
            events += c.checkpoint(item[1])
        elif item[0] == "finish":
            events += c.finish(item[1])
        else:
            side, frame, now_ms = item[:3]
            events += c.receive(side, frame, now_ms, cut=item[3:] == ("cut",))
    return c, events


def out_frames(events):
    """Primary frames in the order they left (released or bypassed)."""
    return [e.packet.data for e in events if isinstance(e, (Released, Bypassed))]


def releases(events):
    return [(e.packet.data, e.reason) for e in events if isinstance(e, Released)]


def requests(events):
    return [e.cause for e in events if isinstance(e, CheckpointRequested)]


def miscompares(events):
    return [e for e in events if isinstance(e, Miscompare)]


def bypasses(events):
    return [(e.packet.data, e.reason) for e in events if isinstance(e, Bypassed)]


def drops(events):
    return [(e.packet.data, e.reason) for e in events if isinstance(e, Dropped)]


def checkpoints_done(events):
    return [e for e in events if isinstance(e, CheckpointDone)]


def interleave(draw, seqs):
    """Hypothesis: the sequences merged into one at random, each keeping
    its own order (the flows of one side, as a guest sends them)."""
    from hypothesis import strategies as st
    seqs = [list(x) for x in seqs if x]
    out = []
    while seqs:
        i = draw(st.integers(0, len(seqs) - 1))
        out.append(seqs[i].pop(0))
        if not seqs[i]:
            seqs.pop(i)
    return out
