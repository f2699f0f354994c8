"""Every JSON document the tests produce is checked against its schema.

colo_cli.schema.audit validates each document it is given when
COLO_COMPARE_SCHEMA_AUDIT names a file, and appends the outcome there; it is
set here, before colo_cli is imported, so the documents of in-process runs
and of subprocesses (serve's event log, CLI runs) are all audited.  At the
end of the session, a document that did not validate fails the run, with
the reasons (test_schemas.py checks that the audit itself works).
"""

import json
import os
import tempfile

_AUDIT_FD, AUDIT_PATH = tempfile.mkstemp(prefix="colo-compare-schema-audit-", suffix=".jsonl")
os.close(_AUDIT_FD)
os.environ["COLO_COMPARE_SCHEMA_AUDIT"] = AUDIT_PATH


def audit_results() -> tuple[dict, list]:
    """(documents validated, by kind; failures)."""
    validated: dict = {}
    failures = []
    try:
        with open(AUDIT_PATH, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("ok"):
                    validated[entry["document"]] = validated.get(entry["document"], 0) + 1
                else:
                    failures.append(entry)
    except OSError:
        pass
    return validated, failures


def pytest_sessionfinish(session, exitstatus):
    validated, failures = audit_results()
    session.config._schema_audit = (validated, failures)
    if failures and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    validated, failures = getattr(config, "_schema_audit", ({}, []))
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(validated.items())) or "none"
    terminalreporter.write_line(f"JSON documents validated against their schemas: {counts}")
    if failures:
        terminalreporter.write_line(f"{len(failures)} JSON documents do NOT match their schema:",
                                    red=True)
        for entry in failures[:20]:
            terminalreporter.write_line(f"  {entry['document']}: {'; '.join(entry['problems'])}")
            terminalreporter.write_line(f"    {entry['doc'][:300]}")
    try:
        os.unlink(AUDIT_PATH)
    except OSError:
        pass
