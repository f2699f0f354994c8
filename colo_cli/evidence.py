"""``replay --evidence``: every miscompared pair in a pcapng that opens in
Wireshark, each frame on its side's interface with a comment saying what
differs and where."""

from __future__ import annotations

from .capture import PcapngWriter
from .frames import payload_marks


def evidence_writer(fileobj, comment: str, p_linktype: int = 1, s_linktype: int = 1):
    """on_miscompare for --evidence: each pair on its side's interface, with a
    comment saying what differs and where; the secondary's frames re-timed
    onto the primary's clock (its own time is in the comment).  Each side
    has an interface per link type its frames have (one, unless a pcapng
    mixes them)."""
    from .render import evidence_comment, evidence_frames
    writer = PcapngWriter(fileobj, comment=comment)
    descriptions = {"primary": "the primary replica's output",
                    "secondary": "the secondary replica's output"}
    interfaces = {}

    def interface(side, linktype):
        iface = interfaces.get((side, linktype))
        if iface is None:
            iface = interfaces[side, linktype] = writer.add_interface(
                side, linktype, description=descriptions[side])
        return iface
    interface("primary", p_linktype)
    interface("secondary", s_linktype)

    def on_miscompare(number, record, p_ts_ns, s_ts_ns, s_on_primary_ns=None):
        e = record.event
        p_mark, s_mark, _name = payload_marks(e)
        for side, pkt, offset, mark, ts, original, linktype in (
                ("primary", e.primary, e.primary_offset, p_mark, p_ts_ns, None, p_linktype),
                ("secondary", e.secondary, e.secondary_offset, s_mark,
                 s_on_primary_ns if s_on_primary_ns is not None else s_ts_ns, s_ts_ns,
                 s_linktype)):
            if pkt is None:
                continue
            comment = evidence_comment(number, record, side, pkt, offset, mark, original)
            # a frame of another link type than its capture's first says so itself
            linktypes = [getattr(f.data, "linktype", linktype) for f in (pkt.fragments or (pkt,))]
            for frame, lt in zip(evidence_frames(pkt), linktypes):
                writer.write(interface(side, lt), ts or 0, frame, comment=comment)
                comment = None      # once per pair side
    return on_miscompare
