"""Frames are named by Wireshark's frame numbers, with tshark as the oracle.

The reader's numbers are compared with ``tshark -T fields -e frame.number``
on the real captures of the corpus (every pcapng file, whose sections,
interfaces, skipped link types, Simple Packet Blocks and custom blocks make
numbering hard, and some pcap files); then a replay of a capture against a
copy with one byte changed must name the frame tshark finds changed.
Skipped when tshark or ../shared/corpus is absent (.ci/run installs tshark).
"""

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from colo_cli.capture import CaptureError, open_capture
from colo_cli.cli import main

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
TSHARK = shutil.which("tshark")

pytestmark = [
    pytest.mark.skipif(TSHARK is None, reason="tshark not installed (apt-get install tshark)"),
    pytest.mark.skipif(not (CORPUS / "manifest.json").exists(), reason="../shared/corpus is absent"),
]


def _manifest():
    if not (CORPUS / "manifest.json").exists():
        return []
    return json.loads((CORPUS / "manifest.json").read_text())


NUMBERED = sorted(e["path"] for e in _manifest() if e["format"] == "pcapng") + [
    "zeek/tls/tls1.2.pcap", "tcpdump/icmpv6.pcap", "dpkt/truncated_dns_2.pcap"]


def tshark_frames(path, extra=()) -> dict:
    """frame.number -> (frame.cap_len, md5 of the frame) as tshark reads it
    (what it reads of a damaged file: tshark stops there too)."""
    r = subprocess.run([TSHARK, "-n", "-r", str(path), "-o", "frame.generate_md5_hash:TRUE",
                        "-T", "fields", "-e", "frame.number", "-e", "frame.cap_len",
                        "-e", "frame.md5_hash", *extra],
                       capture_output=True, text=True, timeout=120)
    frames = {}
    for line in r.stdout.splitlines():
        number, cap_len, md5 = (line.split("\t") + ["", ""])[:3]
        frames[int(number)] = (int(cap_len), md5)
    return frames


def our_frames(path) -> list:
    with open_capture(str(path)) as reader:
        return [(number, data) for number, _ts, data, _orig, _lt in reader]


@pytest.fixture(scope="module")
def tshark_numbers():
    """tshark's view of every file, four tshark runs at a time."""
    paths = [p for p in NUMBERED if (CORPUS / p).exists()]
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(paths, pool.map(lambda p: tshark_frames(CORPUS / p), paths)))


@pytest.mark.parametrize("path", NUMBERED)
def test_frame_numbers_are_tsharks(tshark_numbers, path):
    try:
        ours = our_frames(CORPUS / path)
    except CaptureError:
        pytest.skip("not a capture we read (its error is tested elsewhere)")
    theirs = tshark_numbers[path]
    assert ours or not theirs or all(n not in theirs for n, _ in ours)
    for number, data in ours:
        if number not in theirs:
            # tshark gave up earlier on a damaged file: nothing to compare
            assert number > max(theirs, default=0), (path, number)
            continue
        assert theirs[number][0] == len(data), (path, number)
    # and no frame tshark numbers is one we numbered differently
    numbers = [n for n, _ in ours]
    assert numbers == sorted(set(numbers))


def _unique_frame(path: Path):
    """A frame (number, bytes, offset in the file) whose bytes occur once in
    the file, the latest such: a byte of it can be changed in place."""
    raw = path.read_bytes()
    for number, data in reversed(our_frames(path)):
        if len(data) >= 60 and raw.count(data) == 1:
            return number, data, raw.index(data)
    raise AssertionError(f"{path}: no frame to change")


@pytest.mark.parametrize("path", ["pcapng-test-generator/output_le/difficult/test202.pcapng",
                                  "pcapng-test-generator/output_be/difficult/test202.pcapng",
                                  "pcapng-test-generator/output_le/advanced/test102.pcapng",
                                  "zeek/pcapng-multi-interface.pcapng"])
def test_replay_names_the_frame_tshark_finds_changed(tmp_path, capsys, path):
    """Sections, skipped interfaces, Simple Packet Blocks and custom blocks
    (which Wireshark numbers as frames of their own): the report's
    frame_number is the one tshark gives the changed frame."""
    original = CORPUS / path
    number, data, at = _unique_frame(original)
    copy = bytearray(original.read_bytes())
    copy[at + len(data) - 5] ^= 0xFF                  # a payload byte near the end
    changed = tmp_path / "changed.pcapng"
    changed.write_bytes(bytes(copy))
    before, after = tshark_frames(original), tshark_frames(changed)
    differ = [n for n in before if before[n] != after.get(n)]
    assert differ == [number]                          # tshark's oracle agrees on the frame
    with pytest.raises(SystemExit) as exc:
        main(["replay", "--json", "--no-timeout", str(original), str(changed)])
    assert exc.value.code == 1
    doc = json.loads(capsys.readouterr().out)
    (m,) = doc["miscompares"]
    assert m["primary"]["frame_number"] == m["secondary"]["frame_number"] == number
    # the human report and the evidence file name it the same way
    evidence = tmp_path / "ev.pcapng"
    with pytest.raises(SystemExit):
        main(["replay", "--no-timeout", "--color", "never", "--evidence", str(evidence),
              str(original), str(changed)])
    assert f"primary frame {number:,} (" in capsys.readouterr().out
    comments = subprocess.run([TSHARK, "-n", "-r", str(evidence), "-T", "fields", "-e",
                               "frame.comment"], capture_output=True, text=True).stdout
    assert f"(primary frame {number:,} of its capture)" in comments
    assert f"(secondary frame {number:,} of its capture)" in comments
