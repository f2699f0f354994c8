"""The JSON documents have schemas, shipped in the package, that they follow
and that the manual pages document field by field.

Every document any test produces is validated too (conftest.py audits them
all); here: the schemas themselves, the audit, the documents of the
examples, and the documentation of every field."""

import json
import re
from pathlib import Path

import pytest

from colo_cli import schema
from colo_cli.cli import main

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"
PAGES = {"report": "colo-compare-replay.1", "learn": "colo-compare-replay.1",
         "stats": "colo-compare-stats.1", "event": "colo-compare-serve.1"}


def run_json(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(schema.SCHEMAS))
def test_schemas_are_valid_and_shipped_in_the_package(name):
    import jsonschema
    doc = schema.load(name)                 # read through importlib.resources
    jsonschema.validators.validator_for(doc).check_schema(doc)
    assert doc["$id"].startswith("urn:colo-compare:")
    # a document with nothing in it is not valid: the schemas do require
    assert schema.problems(name, {})


def test_the_package_data_lists_the_schemas():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"colo_cli" = ["schemas/*.json"]' in text
    assert sorted(p.name for p in (ROOT / "colo_cli" / "schemas").glob("*.json")) == \
        sorted(schema.SCHEMAS.values())


def test_the_audit_records_documents_and_finds_those_that_are_not_valid(tmp_path, monkeypatch):
    log = tmp_path / "audit.jsonl"
    monkeypatch.setattr(schema, "_AUDIT_PATH", str(log))
    schema.audit("event", {"v": 2, "time": 1.0, "event": "stop", "unwritten": 0})
    schema.audit("event", {"v": 2, "time": 2.0, "event": "stop", "unwritten": 0})   # the same
    schema.audit("event", {"v": 2, "time": 1.0, "event": "stop"})           # unwritten missing
    schema.audit("event", {"v": 2, "time": 1.0, "event": "nonsense"})
    schema.audit("report", {"not": object()})                               # not JSON at all
    validated, failures = schema.check_audit_log(str(log))
    assert validated == {"event": 3}
    kinds = [(kind, problems[0]) for kind, problems, _start in failures]
    assert kinds[0] == ("event", "(top): 'unwritten' is a required property")
    assert kinds[1][0] == "event" and "nonsense" in kinds[1][1]
    assert kinds[2][0] == "report" and "TypeError" in kinds[2][1]


def test_the_audit_is_on_for_the_test_suite():
    # conftest.py sets it before colo_cli is imported: every document counts
    assert schema._AUDIT_PATH is not None


def test_example_documents_validate(capsys, tmp_path):
    code, doc = run_json(capsys, "replay", "--json", str(EX / "diverge-primary.pcap"),
                         str(EX / "diverge-secondary.pcap"))
    assert code == 1 and schema.problems("report", doc) == []
    assert doc["tool"] == schema.tool() and doc["version"] == schema.REPORT_VERSION
    (tmp_path / "r.json").write_text(json.dumps(doc))
    code, stats = run_json(capsys, "stats", "--json", str(tmp_path / "r.json"))
    assert code == 0 and schema.problems("stats", stats) == []
    assert stats["tool"] == doc["tool"]
    code, doc = run_json(capsys, "replay", "--json", str(EX / "match-primary.pcap"),
                         str(EX / "match-secondary.pcap"))
    assert code == 0 and schema.problems("report", doc) == []
    code, doc = run_json(capsys, "replay", "--json", "--learn-noise", str(EX / "diverge-primary.pcap"),
                         str(EX / "diverge-secondary.pcap"), "--no-timeout")
    assert schema.problems("learn", doc) == [] and doc["tool"] == schema.tool()


def test_a_document_that_breaks_its_schema_is_caught(capsys):
    code, doc = run_json(capsys, "replay", "--json", str(EX / "diverge-primary.pcap"),
                         str(EX / "diverge-secondary.pcap"))
    doc["miscompares"][0]["primary"]["index"] = 2           # the old name
    assert any("index" in p for p in schema.problems("report", doc))
    doc["miscompares"][0]["primary"].pop("index")
    doc["miscompares"][0]["primary"]["frame_number"] = 0     # numbered from 1
    assert schema.problems("report", doc)


def test_truncated_lists_say_so(capsys, tmp_path):
    from colo_cli.render import replay_json
    from colo_cli.capture import open_capture
    from colo_cli.replay import replay
    with open_capture(str(EX / "diverge-primary.pcap")) as p, \
            open_capture(str(EX / "diverge-secondary.pcap")) as s:
        result = replay(p, s, detail_limit=1)
    doc = replay_json(result)
    assert schema.problems("report", doc) == []
    assert (len(doc["miscompares"]), doc["miscompares_total"], doc["miscompares_truncated"]) == (1, 2, True)
    assert (len(doc["checkpoint_requests"]), doc["checkpoint_requests_truncated"]) == (1, True)
    assert doc["top_divergent_truncated"] is False
    assert "miscompares: the first 1 of 2 are listed with their details; all are counted" in doc["notes"]


def test_hold_time_buckets_are_cumulative_and_named_in_seconds(capsys):
    from colo_cli.core.stats import HOLD_BOUNDS_S
    code, doc = run_json(capsys, "replay", "--json", str(EX / "diverge-primary.pcap"),
                         str(EX / "diverge-secondary.pcap"))
    hold = doc["stats"]["hold_seconds"]
    bounds = list(hold["buckets"])
    assert bounds == [repr(b) for b in HOLD_BOUNDS_S] + ["+Inf"]
    assert bounds[0] == "0.000125" and bounds[-2] == "16.384"
    counts = list(hold["buckets"].values())
    assert counts == sorted(counts) and counts[-1] == hold["count"] == doc["stats"]["hold_ms"]["count"]
    assert abs(hold["sum"] - doc["stats"]["hold_ms"]["sum_ms"] / 1000) < 1e-6
    # the Prometheus exposition has the same buckets
    from colo_cli.metrics import from_report, prometheus
    text = prometheus(from_report(doc, "r.json"))
    for le, n in hold["buckets"].items():
        assert f'colo_compare_hold_seconds_bucket{{le="{le}"}} {n}' in text


# -- every field is documented ------------------------------------------------------------

def _fields(node, out=None) -> set:
    """Every property name a schema defines (its own: references to another
    schema are documented there)."""
    out = set() if out is None else out
    if isinstance(node, dict):
        for name, sub in (node.get("properties") or {}).items():
            out.add(name)
            _fields(sub, out)
        for key, sub in node.items():
            if key != "properties":
                _fields(sub, out)
    elif isinstance(node, list):
        for sub in node:
            _fields(sub, out)
    return out


def _documented(page: str) -> set:
    """The words a manual page sets in bold at the start of a line (.B,
    .BR, .BI) or inline (\\fB...\\fR)."""
    text = (ROOT / "man" / page).read_text().replace("\\-", "-").replace("\\e", "\\")
    words = set()
    for line in text.splitlines():
        m = re.match(r'\.B[RI]? +(?:"([^"]+)"|(\S+))', line)
        if m:
            words.add(m.group(1) or m.group(2))
        words.update(re.findall(r"\\fB(.+?)\\f[RPI]", line))
    return {w.strip(",.;:()") for w in words}


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_field_is_documented_in_the_manual(name):
    missing = sorted(_fields(schema.load(name)) - _documented(PAGES[name]))
    assert not missing, f"{PAGES[name]} does not document {missing}"
