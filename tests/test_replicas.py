"""Real captures of two replicas (tests/replicas/: an HTTP server, a DNS
server, redis and ping in network namespaces with identical addresses,
captured with tcpdump; real kernels chose the ISNs, IP IDs and
segmentation, one replica with TSO/GSO off).  See tests/replicas/README.md.

Equivalent traffic must match with --normalize-seq and the noise rules the
learning mode finds; a one-byte divergence planted in a served file must be
found at its stream offset."""

import json
import os

import pytest

from colo_cli.cli import main

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replicas")
EXPECTED = json.load(open(os.path.join(HERE, "expected.json")))


def cap(name):
    return os.path.join(HERE, name)


def replay_json(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(["replay", "--json", *args])
    return exc.value.code, json.loads(capsys.readouterr().out)


NOISE = ["--ignore", "dns.id", "--ignore", "icmp:8-24"]


def test_without_normalization_independent_isns_do_not_match(capsys):
    code, doc = replay_json(capsys, cap("equal-a.pcap"), cap("equal-b.pcap"), *NOISE)
    assert code == 1
    # every TCP data segment waits for a twin at its own sequence numbers
    assert doc["unmatched"]["primary"] > 0 or doc["checkpoint_requests_total"] > 0


@pytest.mark.parametrize("timeouts", [[], ["--no-timeout"]])
def test_equivalent_replicas_match(capsys, timeouts):
    code, doc = replay_json(capsys, cap("equal-a.pcap"), cap("equal-b.pcap"),
                            "--normalize-seq", *NOISE, *timeouts)
    assert doc["miscompares"] == [] and doc["checkpoint_requests_total"] == 0
    assert doc["unmatched"] == {"primary": 0, "secondary": 0}
    assert code == 0 and doc["result"] == "match"
    st = doc["stats"]
    assert st["released"]["match"] == st["frames_in"]["primary"] == 150
    # the noise rules did work, and say so
    assert st["ignored"]["dns.id"] >= 1 and st["ignored"]["icmp:8-24"] >= 1
    assert doc["settings"]["ignore"] == ["dns.id", "icmp:8-24"]


def test_learning_finds_the_natural_noise(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["replay", cap("equal-a.pcap"), cap("equal-b.pcap"), "--normalize-seq",
              "--learn-noise", "--json"])
    assert exc.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    rules = [r["rule"] for r in doc["rules"]]
    assert "dns.id" in rules and any(r.startswith("icmp:8-") for r in rules)
    assert doc["checkpoint_requests"]["after"] == 0 and doc["checkpoint_requests"]["before"] > 0
    assert all(r["checkpoints_avoided"] > 0 for r in doc["rules"])
    # --normalize-seq was given, so it is not suggested again
    assert doc["normalize_seq"] == {"suggested": False, "checkpoints_avoided": 0}
    assert not doc["ignore_options"].startswith("--normalize-seq")


def test_learning_without_normalization_suggests_it(capsys):
    """Independent ISNs are not noise a byte rule can hide: the learning mode
    tries --normalize-seq itself and suggests it with what it avoids."""
    with pytest.raises(SystemExit) as exc:
        main(["replay", cap("equal-a.pcap"), cap("equal-b.pcap"), "--learn-noise", "--json"])
    assert exc.value.code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["normalize_seq"]["suggested"] is True
    assert doc["normalize_seq"]["checkpoints_avoided"] > 0
    assert doc["checkpoint_requests"]["after"] == 0
    assert doc["ignore_options"].startswith("--normalize-seq --ignore ")
    # the suggested options really make the pair match
    with pytest.raises(SystemExit) as exc:
        main(["replay", "-q", cap("equal-a.pcap"), cap("equal-b.pcap"),
              *doc["ignore_options"].replace("'", "").split()])
    assert exc.value.code == 0
    with pytest.raises(SystemExit):
        main(["replay", cap("equal-a.pcap"), cap("equal-b.pcap"), "--learn-noise", "--color", "never"])
    out = capsys.readouterr().out
    assert "--normalize-seq" in out.split("to use them:")[0]
    assert "to use them: colo-compare replay --normalize-seq --ignore" in out


def test_planted_byte_is_found_at_its_stream_offset(capsys):
    planted = EXPECTED["pairs"]["diverge"]["planted"]
    code, doc = replay_json(capsys, cap("diverge-a.pcap"), cap("diverge-b.pcap"),
                            "--normalize-seq", *NOISE)
    assert code == 1
    (m,) = doc["miscompares"]
    server, client = planted["flow"]["server"], planted["flow"]["client"]
    assert m["flow"] == f"tcp {server} > {client}" and m["protocol"] == "tcp"
    assert m["cause"] == "content"
    assert m["stream_offset"] == planted["stream_offset"] == 100193
    assert m["raw_seq"] == planted["seq_a"]
    p_frame = bytes.fromhex(m["primary"]["frame_hex"])
    s_frame = bytes.fromhex(m["secondary"]["frame_hex"])
    assert p_frame[m["primary"]["offset"]] == planted["byte_a"]
    assert s_frame[m["secondary"]["offset"]] == planted["byte_b"]
    # only the planted byte's connection is held back; nothing else diverges
    assert doc["checkpoint_requests_total"] == 1


def test_planted_byte_with_the_replica_roles_swapped(capsys):
    planted = EXPECTED["pairs"]["diverge"]["planted"]
    code, doc = replay_json(capsys, cap("diverge-b.pcap"), cap("diverge-a.pcap"),
                            "--normalize-seq", *NOISE)
    (m,) = doc["miscompares"]
    assert m["stream_offset"] == planted["stream_offset"] and m["raw_seq"] == planted["seq_b"]
