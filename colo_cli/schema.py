"""The JSON documents colo-compare writes, their versions and their schemas.

Four documents, each with a JSON Schema (draft 2020-12) shipped in the
package (``colo_cli/schemas/``) and every field described in the manual
pages:

=========  ================================  =================================
document   written by                        schema
=========  ================================  =================================
report     ``replay --json``                 ``replay-report.schema.json``
learn      ``replay --learn-noise --json``   ``learn-noise.schema.json``
stats      ``stats --json``                  ``stats.schema.json``
event      each line of ``serve --events``   ``event.schema.json``
=========  ================================  =================================

Every document names the program that wrote it the same way, ``tool``:
``{"name": "colo-compare", "version": "..."}`` (an event log: its ``start``
line).  A document's ``version`` changes when a field is renamed or removed;
new fields do not change it.

``audit(name, doc)`` is called by each writer.  It does nothing unless the
environment variable ``COLO_COMPARE_SCHEMA_AUDIT`` names a file: then every
document is appended to that file, and ``check_audit_log`` later validates
them all (with the ``jsonschema`` package, a test dependency).  The test
suite sets it, so that every JSON document any test produces, in-process or
in a subprocess, is checked against its schema; the validation is done at
the end, not by the writer, because it is slow (a quarter of a millisecond
per event line): a serve flooded with events would no longer be the serve
under test.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources

from . import __version__

TOOL_NAME = "colo-compare"

#: ``replay --json``: 2 renamed each frame's ``index`` (counted from 0) to
#: ``frame_number`` (Wireshark's, from 1) and made ``tool`` an object.
REPORT_VERSION = 2
#: ``stats --json``: 2 replaced ``made_by`` with ``tool``.
STATS_VERSION = 2
#: ``serve --events`` lines (their ``v``): 2 renamed a miscompare's frames'
#: ``index`` to ``frame_number`` and the start event's ``version`` to ``tool``.
EVENTS_VERSION = 2
#: ``replay --learn-noise --json``
LEARN_VERSION = 1

SCHEMAS = {"report": "replay-report.schema.json", "learn": "learn-noise.schema.json",
           "stats": "stats.schema.json", "event": "event.schema.json"}

AUDIT_ENV = "COLO_COMPARE_SCHEMA_AUDIT"
_AUDIT_PATH = os.environ.get(AUDIT_ENV) or None


def tool() -> dict:
    """The producing tool, as every document names it."""
    return {"name": TOOL_NAME, "version": __version__}


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    """The schema of a document (``report``, ``learn``, ``stats``, ``event``)."""
    text = resources.files("colo_cli").joinpath("schemas", SCHEMAS[name]).read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=None)
def _validator(name: str):
    """A validator of one document; the schemas refer to each other by
    their ``$id`` (``urn:colo-compare:...``), so all of them are registered."""
    import jsonschema
    from referencing import Registry, Resource
    registry = Registry().with_resources(
        (load(n)["$id"], Resource.from_contents(load(n))) for n in SCHEMAS)
    schema = load(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def problems(name: str, doc) -> list[str]:
    """Why ``doc`` is not a valid ``name`` document (empty: it is)."""
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
            for e in _validator(name).iter_errors(doc)]


def audit(name: str, doc) -> None:
    """Under the test suite (see the module doc): record ``doc`` for
    check_audit_log.  Otherwise nothing, at the cost of one comparison."""
    if _AUDIT_PATH is None:
        return
    try:
        line = json.dumps({"document": name, "doc": doc}, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        line = json.dumps({"document": name, "unserialisable": f"{type(e).__name__}: {e}"})
    with open(_AUDIT_PATH, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def check_audit_log(path: str) -> tuple[dict, list]:
    """Validate every document recorded in an audit log: (how many of each
    kind were validated, [(kind, problems, the document's start)] for those
    that are not valid).  A document recorded twice (the same event in
    several runs, but for its time) is validated once."""
    validated: dict = {}
    failures = []
    seen = set()
    try:
        f = open(path, encoding="utf-8")
    except OSError:
        return validated, failures
    with f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                failures.append(("?", ["an audit line is not JSON (cut short?)"], line[:300]))
                continue
            name = entry.get("document", "?")
            if "unserialisable" in entry:
                failures.append((name, [entry["unserialisable"]], ""))
                continue
            doc = entry.get("doc")
            key = json.dumps([name, {k: v for k, v in doc.items() if k != "time"}
                              if isinstance(doc, dict) else doc], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            found = problems(name, doc)
            validated[name] = validated.get(name, 0) + 1
            if found:
                failures.append((name, found[:5], json.dumps(doc)[:300]))
    return validated, failures
