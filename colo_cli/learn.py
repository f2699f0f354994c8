"""``replay --learn-noise``: given two captures known to be equivalent, find
the noise rules that would remove their checkpoints.

In the spirit of Diffy (Twitter's differential testing): what differs between
two runs of equivalent replicas is noise, and the places where it differs
become rules.  The captures are replayed; each miscompare that a rule would
obviously hide suggests that rule: a field rule when the miscompare's
explanation in protocol terms (``colo_cli.explain``) has a rule for every
field that differs (``dns.ttl``, ``http.header:ETag``...), else the rule the
bytes suggest (the DNS ID, an HTTP-style header line, the byte range of a
datagram); the replay is repeated with the rules found so
far until no new one turns up (a rule can hide one difference and uncover
the next); then each rule is left out in turn to count the checkpoint
requests it avoids on its own.

TCP streams of replicas whose stacks chose their own initial sequence
numbers never line up, and no byte rule can fix that: when the captures were
not already compared with ``--normalize-seq``, learning also tries it, and
suggests it (with the checkpoints it avoids) when it removes some.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace

from . import schema
from .core import parse_rule, ports_of
from .replay import replay

#: entries of the "left unexplained" list in the JSON document
UNEXPLAINED_LISTED = 20


def suggestions_for(record) -> list[str]:
    """The rules that would hide a miscompare: the field rules of its
    explanation when every differing field has one, else the byte rule its
    bytes suggest (or none)."""
    explanation = record.explanation
    if explanation is not None:
        rules = []
        for d in explanation.differences:
            if d.rule is None:
                rules = []
                break
            if d.rule not in rules:
                rules.append(d.rule)
        if rules and not explanation.more:
            return rules
    text = suggest(record.event)
    return [text] if text is not None else []

MAX_ROUNDS = 6


@dataclass
class Learned:
    text: str
    explains: int = 0            # miscompares it would hide when it was found
    avoided: int = 0             # checkpoint requests it avoids on its own
    example: str = ""


@dataclass
class LearnResult:
    given: list                  # rules given with --ignore
    learned: list = field(default_factory=list)   # Learned, in the order found
    requests_before: int = 0     # checkpoint requests with the given rules only
    requests_after: int = 0      # with every learned rule as well
    miscompares_before: int = 0
    miscompares_after: int = 0
    unexplained: Counter = field(default_factory=Counter)  # "flow cause" -> n, left after
    rounds: int = 0              # replays run, in all
    normalize_seq: bool = False  # --normalize-seq suggested (it was not given)
    normalize_avoided: int = 0   # checkpoint requests it avoids, with the rules

    def command_line(self) -> str:
        rules = [r.text for r in self.given] + [l.text for l in self.learned]
        options = ["--normalize-seq"] if self.normalize_seq else []
        return " ".join(options + [f"--ignore '{r}'" for r in rules])


def learn_noise(open_pair, config, *, hold: bool = False, vnet_hdr_len: int = 0,
                selection=None) -> LearnResult:
    """``open_pair()`` opens the two captures afresh (they are read several
    times) and returns (primary reader, secondary reader); ``selection``
    (``replay.Selection``) chooses the frames compared, every time."""
    given = list(config.ignore)
    result = LearnResult(given=given)

    def run(rules, normalize):
        suggestions: Counter = Counter()
        examples: dict = {}
        unexplained: Counter = Counter()

        def seen(number, record, *_):
            found = suggestions_for(record)
            explanation = record.explanation
            example = (f"{record.flow}: {explanation.text}" if explanation is not None else
                       f"{record.flow}, {record.event.cause} at offset {record.event.stream_offset}")
            for text in found:
                suggestions[text] += 1
                examples.setdefault(text, example)
            if not found:
                unexplained[f"{record.flow}: {record.event.cause}"] += 1
        p, s = open_pair()
        try:
            res = replay(p, s, replace(config, ignore=tuple(rules), normalize_seq=normalize),
                         hold=hold, vnet_hdr_len=vnet_hdr_len, detail_limit=0, on_miscompare=seen,
                         selection=selection)
        finally:
            p.close()
            s.close()
        result.rounds += 1
        return res, suggestions, examples, unexplained

    def learn_rounds(rules, normalize):
        """Replay, adding what the miscompares suggest, until nothing new
        turns up; returns the first replay's result."""
        first = None
        for _ in range(MAX_ROUNDS):
            res, suggestions, examples, _ = run(rules, normalize)
            if first is None:
                first = res
            known = {r.text for r in rules}
            new = [(text, n) for text, n in suggestions.most_common() if text not in known]
            if not new:
                break
            for text, n in new:
                rules.append(parse_rule(text))
                result.learned.append(Learned(text, explains=n, example=examples[text]))
        return first

    rules = list(given)
    normalize = config.normalize_seq
    first = learn_rounds(rules, normalize)
    final, _, _, unexplained = run(rules, normalize)
    if not normalize and final.requests_total:
        normalized, _, _, _ = run(rules, True)
        if normalized.requests_total < final.requests_total:
            normalize = result.normalize_seq = True
            learn_rounds(rules, True)     # aligned streams may show new noise
            plain, _, _, _ = run(rules, False)
            final, _, _, unexplained = run(rules, True)
            result.normalize_avoided = plain.requests_total - final.requests_total
    result.requests_before = first.requests_total
    result.miscompares_before = first.miscompares_total
    result.requests_after = final.requests_total
    result.miscompares_after = final.miscompares_total
    result.unexplained = unexplained
    for learned in result.learned:
        without = [r for r in rules if r.text != learned.text]
        res, _, _, _ = run(without, normalize)
        learned.avoided = res.requests_total - final.requests_total
    return result


def learn_json(result: LearnResult) -> dict:
    doc = {"version": schema.LEARN_VERSION, "tool": schema.tool(),
           "command": "replay --learn-noise",
            "given": [r.text for r in result.given],
            "rules": [{"rule": l.text, "explains_miscompares": l.explains,
                       "checkpoints_avoided": l.avoided, "example": l.example}
                      for l in result.learned],
            "checkpoint_requests": {"before": result.requests_before, "after": result.requests_after},
            "miscompares": {"before": result.miscompares_before, "after": result.miscompares_after},
            "unexplained": dict(result.unexplained.most_common(UNEXPLAINED_LISTED)),
            "unexplained_truncated": len(result.unexplained) > UNEXPLAINED_LISTED,
            "normalize_seq": {"suggested": result.normalize_seq,
                              "checkpoints_avoided": result.normalize_avoided},
            "rounds": result.rounds,
            "ignore_options": result.command_line()}
    schema.audit("learn", doc)
    return doc


# -- which rule would explain a miscompare --------------------------------------

_HEADER_LINE = re.compile(rb"^([A-Za-z0-9-]{1,64}):[ \t]")


def _differing(p, s, checksum_at: int) -> list[int]:
    """The offsets where two compared parts (L4 header on) differ, leaving
    out the 2-byte checksum at ``checksum_at``, which follows from the rest."""
    a = p.data[p.cmp_off:p.cmp_end]
    b = s.data[s.cmp_off:s.cmp_end]
    return [i for i in range(min(len(a), len(b)))
            if a[i] != b[i] and not checksum_at <= i < checksum_at + 2]


def suggest(event) -> str | None:
    """A rule that would hide this miscompare, if one is obvious: the DNS ID,
    an HTTP-style header line, or the byte range of a datagram."""
    p, s = event.primary, event.secondary
    if p is None or s is None:
        return None
    sport, dport = ports_of(event.key)
    if event.kind == "udp" and event.cause == "content":
        diff = _differing(p, s, checksum_at=6)
        if not diff:
            return "udp.checksum"
        if 53 in (sport, dport) and all(8 <= i < 10 for i in diff):
            return "dns.id"
        if min(diff) >= 8:
            port = min(sport, dport)
            return f"udp:{port}:{min(diff) - 8}-{max(diff) - 8 + 1}"
        return None
    if event.kind == "icmp" and event.cause == "content":
        diff = _differing(p, s, checksum_at=2)
        if not diff:
            return "icmp.checksum"
        if min(diff) >= 8:
            # in the data (ping's send time): the bytes that differ
            return f"icmp:{min(diff)}-{max(diff) + 1}"
        return None
    if event.kind == "tcp" and event.cause == "content" and event.primary_offset >= 0:
        data = p.data
        at = event.primary_offset
        line_start = data.rfind(b"\n", p.cmp_off, at) + 1 or p.cmp_off
        if line_start < p.cmp_off:
            line_start = p.cmp_off
        line_end = data.find(b"\r\n", at, p.cmp_end)
        if line_end < 0:
            return None
        m = _HEADER_LINE.match(data[line_start:line_end])
        if not m:
            return None
        name = m.group(1).decode("ascii")
        if name.lower() == "date":
            return "http.date"
        port = min(sport, dport)
        return f"tcp:{port}:/(?im)^{re.escape(name)}:[ \\t]*[^\\r\\n]*/"
    return None


def run(options) -> int:
    """``colo-compare replay --learn-noise``: learn from the two captures of
    ``options`` (a ``ReplayOptions``; read several times, so not from
    stdin) and print what was found; returns the exit status (0)."""
    from .capture import open_capture
    from .errors import EXIT_SAME
    from .outputs import stdout_guard
    from .render import make_console, print_learned
    from .replay import selection_of

    o = options
    selection = selection_of(o)

    def open_pair():
        p = open_capture(o.primary)
        try:
            return p, open_capture(o.secondary)
        except BaseException:
            p.close()
            raise
    result = learn_noise(open_pair, o.config, hold=o.hold, vnet_hdr_len=o.vnet_hdr_len,
                         selection=selection)
    with stdout_guard():
        if o.as_json:
            print(json.dumps(learn_json(result), indent=1))
        else:
            print_learned(make_console(color=o.color), result, o.primary, o.secondary)
    return EXIT_SAME
