"""Every JSON document the tests produce is checked against its schema.

colo_cli.schema.audit records each document it is given when
COLO_COMPARE_SCHEMA_AUDIT names a file; it is set here, before colo_cli is
imported, so the documents of in-process runs and of subprocesses (serve's
event log, CLI runs) are all recorded.  At the end of the session every one
is validated (schema.check_audit_log), and a document that is not valid
fails the run, with the reasons (test_schemas.py checks that the audit
itself works).
"""

import os
import tempfile

_AUDIT_FD, AUDIT_PATH = tempfile.mkstemp(prefix="colo-compare-schema-audit-", suffix=".jsonl")
os.close(_AUDIT_FD)
os.environ["COLO_COMPARE_SCHEMA_AUDIT"] = AUDIT_PATH


def pytest_sessionfinish(session, exitstatus):
    from colo_cli.schema import check_audit_log
    validated, failures = check_audit_log(AUDIT_PATH)
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
        for kind, problems, start in failures[:20]:
            terminalreporter.write_line(f"  {kind}: {'; '.join(problems)}")
            terminalreporter.write_line(f"    {start}")
    try:
        os.unlink(AUDIT_PATH)
    except OSError:
        pass
