"""``replay --learn-noise``: given two captures known to be equivalent, find
the noise rules that would remove their checkpoints.

In the spirit of Diffy (Twitter's differential testing): what differs between
two runs of equivalent replicas is noise, and the places where it differs
become rules.  The captures are replayed; each miscompare that a rule would
obviously hide (the DNS ID, an HTTP-style header, the byte range of a
datagram) suggests that rule; the replay is repeated with the rules found so
far until no new one turns up (a rule can hide one difference and uncover
the next); then each rule is left out in turn to count the checkpoint
requests it avoids on its own.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from .core.noise import parse_rule, suggest
from .replay import replay

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
    rounds: int = 0

    def command_line(self) -> str:
        rules = [r.text for r in self.given] + [l.text for l in self.learned]
        return " ".join(f"--ignore '{r}'" for r in rules)


def learn_noise(open_pair, config, *, hold: bool = False, vnet_hdr_len: int = 0) -> LearnResult:
    """``open_pair()`` opens the two captures afresh (they are read several
    times) and returns (primary reader, secondary reader)."""
    given = list(config.ignore)
    result = LearnResult(given=given)

    def run(rules):
        suggestions: Counter = Counter()
        examples: dict = {}
        unexplained: Counter = Counter()

        def seen(number, record, *_):
            text = suggest(record.event)
            if text is not None:
                suggestions[text] += 1
                examples.setdefault(text, f"{record.flow}, {record.event.cause} at "
                                          f"offset {record.event.stream_offset}")
            else:
                unexplained[f"{record.flow}: {record.event.cause}"] += 1
        p, s = open_pair()
        try:
            res = replay(p, s, replace(config, ignore=tuple(rules)), hold=hold,
                         vnet_hdr_len=vnet_hdr_len, detail_limit=0, on_miscompare=seen)
        finally:
            p.close()
            s.close()
        return res, suggestions, examples, unexplained

    rules = list(given)
    first = None
    for round_no in range(1, MAX_ROUNDS + 1):
        res, suggestions, examples, unexplained = run(rules)
        result.rounds = round_no
        if first is None:
            first = res
        known = {r.text for r in rules}
        new = [(text, n) for text, n in suggestions.most_common() if text not in known]
        if not new:
            break
        for text, n in new:
            rules.append(parse_rule(text))
            result.learned.append(Learned(text, explains=n, example=examples[text]))
    final, _, _, unexplained = run(rules)
    result.requests_before = first.requests_total
    result.miscompares_before = first.miscompares_total
    result.requests_after = final.requests_total
    result.miscompares_after = final.miscompares_total
    result.unexplained = unexplained
    for learned in result.learned:
        without = [r for r in rules if r.text != learned.text]
        res, _, _, _ = run(without)
        learned.avoided = res.requests_total - final.requests_total
    return result


def learn_json(result: LearnResult) -> dict:
    return {"version": 1, "command": "replay --learn-noise",
            "given": [r.text for r in result.given],
            "rules": [{"rule": l.text, "explains_miscompares": l.explains,
                       "checkpoints_avoided": l.avoided, "example": l.example}
                      for l in result.learned],
            "checkpoint_requests": {"before": result.requests_before, "after": result.requests_after},
            "miscompares": {"before": result.miscompares_before, "after": result.miscompares_after},
            "unexplained": dict(result.unexplained.most_common(20)),
            "rounds": result.rounds,
            "ignore_options": result.command_line()}
