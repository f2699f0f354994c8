"""The report for people and the rest of the command-line surface: hexdumps
that show every differing region (side by side, or stacked on an 80-column
terminal, prose wrapped between words), the evidence file's section comment
and timeline, the options every command shares, and shell completion of
file arguments."""

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import dpkt
import pytest

from colo_cli.capture import PcapWriter, open_capture
from colo_cli.cli import main
from colo_cli.render import SIDE_BY_SIDE_WIDTH, make_console, print_hexdump
from colo_cli.replay import replay
from colo_cli.testing import tcp_frame, udp_frame

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"
DIVERGE = [str(EX / "diverge-primary.pcap"), str(EX / "diverge-secondary.pcap")]


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def write(path, frames, t0=1_700_000_000 * 10**9):
    with open(path, "wb") as f:
        w = PcapWriter(f)
        for i, frame in enumerate(frames):
            w.write(t0 + i * 1_000_000, frame)
    return str(path)


def example_result():
    with open_capture(DIVERGE[0]) as p, open_capture(DIVERGE[1]) as s:
        return replay(p, s)


class Terminal(io.StringIO):
    """What a terminal of a given width would receive."""
    def isatty(self):
        return True


def render(width, color="never"):
    """The examples' two miscompares as printed on a terminal of ``width``."""
    out = Terminal()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        console = make_console(out, color=color)
        result = example_result()
        for i, rec in enumerate(result.miscompares, 1):
            print_hexdump(console, rec, i, len(result.miscompares))
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue()


# -- hexdumps -----------------------------------------------------------------------------

def test_an_80_column_terminal_gets_the_frames_stacked_and_prose_wrapped_between_words():
    text = render(80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    # primary above secondary, each on lines of its own
    p = lines.index(next(l for l in lines if l.startswith("primary frame 3 (")))
    s = lines.index(next(l for l in lines if l.startswith("secondary frame 4 (")))
    assert p < s and "|" not in lines[p] and "|" not in lines[p + 1]
    assert lines[p + 1].startswith("0000  52 54 00 00 00 02") and lines[s + 1].startswith("0000  ")
    # no word is cut: every word of the prose is whole on some line
    title = ("Miscompare 1 of 2 at 6.120 ms: tcp 192.0.2.10:80 > 198.51.100.7:51000: content "
             "differs at stream offset 47 (seq 3000000047)")
    words = " ".join(text.split()).split(" ")
    for word in title.split(" ") + ['"...20:00:01', "GMT\""]:
        assert word in words, word
    # continuation lines are indented under their first line
    at = next(i for i, l in enumerate(lines) if l.startswith("Miscompare 1 of 2"))
    assert lines[at + 1].startswith("    ") and not lines[at + 1].startswith("     ")


def test_a_wide_terminal_gets_them_side_by_side():
    text = render(SIDE_BY_SIDE_WIDTH)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= SIDE_BY_SIDE_WIDTH
    row = next(l for l in lines if l.startswith("0050  2c 00 04"))    # the DNS answer's TTL
    left, right = row.split(" |  ")
    assert left.rstrip().endswith(",......") and right.startswith("0050  2b 00 04")
    assert render(SIDE_BY_SIDE_WIDTH - 1).count(" |  ") == 0


def test_ascii_column_and_carets_under_every_differing_byte():
    text = render(200)
    lines = text.splitlines()
    row = next(l for l in lines if l.startswith("0060  3a 30 30 3a 30 30"))
    assert row.split(" |  ")[0].endswith(":00:00 GMT..Cont")
    carets = lines[lines.index(row) + 1]
    # under the hex byte and under its ASCII column, on both sides
    assert carets.count("^^") == 2 and carets.count("^") == 6


def test_colour_marks_the_differing_bytes_instead_of_carets():
    text = render(200, color="always")
    assert "\x1b[" in text and "^^" not in text


def test_every_differing_region_is_shown_with_context_up_to_a_limit(capsys, tmp_path):
    payload = bytes(range(48, 48 + 64)) * 16           # 1 KiB of text
    changed = bytearray(payload)
    for at in (100, 500, 900):                          # three regions, far apart
        changed[at] ^= 0x20
    p = write(tmp_path / "p.pcap", [udp_frame(payload, sport=7000, dport=7000)])
    s = write(tmp_path / "s.pcap", [udp_frame(bytes(changed), sport=7000, dport=7000)])
    code, out, _ = run(capsys, "replay", p, s, "--color", "never")
    assert code == 1
    l4 = 14 + 20 + 8
    for at in (100, 500, 900):
        line = (l4 + at) - (l4 + at) % 16
        # the line, and a line of context either side
        for k in (line - 16, line, line + 16):
            assert f"\n{k:04x}  " in out, (at, hex(k))
    assert out.count("  ...") >= 3
    # past the limit, the rest are counted
    many = bytearray(payload)
    for at in range(0, 1024, 64):
        many[at] ^= 0x20
    s = write(tmp_path / "s2.pcap", [udp_frame(bytes(many), sport=7000, dport=7000)])
    code, out, _ = run(capsys, "replay", p, s, "--color", "never")
    assert "(8 more differing regions not shown;" in out


def test_tcp_hexdump_aligns_the_stream_whatever_the_segment_starts(capsys, tmp_path):
    stream = bytes(range(32, 127)) * 10
    bad = bytearray(stream)
    bad[700] ^= 1
    p = write(tmp_path / "p.pcap", [tcp_frame(stream, seq=1000, ack=1)])
    s = write(tmp_path / "s.pcap", [tcp_frame(bytes(bad[:650]), seq=1000, ack=1),
                                    tcp_frame(bytes(bad[650:]), seq=1650, ack=1)])
    code, out, _ = run(capsys, "replay", p, s, "--color", "never")
    assert code == 1 and "content differs at stream offset 700 " in out
    carets = next(l for l in out.splitlines() if "^^" in l)
    first = carets.index("^^")
    second = carets.index("^^", first + 2)
    # the marked byte is in the same column of both sides' dumps, though the
    # primary's segment starts 650 bytes earlier in the stream than the secondary's
    assert second - first == SIDE_BY_SIDE_WIDTH // 2 + 2     # one side and " |  "
    row = out.splitlines()[out.splitlines().index(carets) - 1]
    assert row[first:first + 2] == f"{stream[700]:02x}"
    assert row[second:second + 2] == f"{bad[700]:02x}"


def test_hexdump_all_and_0(capsys):
    code, out, _ = run(capsys, "replay", *DIVERGE, "--hexdump", "all", "--color", "never")
    assert out.count("Miscompare ") == 2 and "not shown" not in out
    code, out, _ = run(capsys, "replay", *DIVERGE, "--hexdump", "--color", "never")
    assert out.count("Miscompare ") == 2
    code, out, _ = run(capsys, "replay", *DIVERGE, "--hexdump", "0")
    assert "Miscompare " not in out and "not shown" not in out


def test_verbose_lists_every_setting_and_miscompare(capsys):
    code, out, _ = run(capsys, "replay", *DIVERGE, "-v", "--hexdump", "0", "--color", "never")
    assert code == 1
    assert "settings: compare timeout 3000 ms; scan cycle 1000 ms; max queue size 1024;" in out
    assert "HTTP response header Date:" in out and "DNS answer 1 example.org A: TTL 300 vs 299" in out


# -- evidence ------------------------------------------------------------------------------

def _blocks(raw):
    pos = 0
    while pos < len(raw):
        btype, blen = struct.unpack_from("<II", raw, pos)
        yield btype, raw[pos:pos + blen]
        pos += blen


def _options(body):
    out = {}
    pos = 0
    while pos + 4 <= len(body):
        code, length = struct.unpack_from("<HH", body, pos)
        if code == 0:
            break
        out.setdefault(code, body[pos + 4:pos + 4 + length].decode())
        pos += 4 + length + (-length % 4)
    return out


def test_evidence_section_comment_and_secondary_retimed_onto_the_primary(capsys, tmp_path):
    ev = tmp_path / "ev.pcapng"
    code, _, _ = run(capsys, "replay", *DIVERGE, "-q", "--evidence", str(ev), "--ignore", "dns.id")
    assert code == 1
    raw = ev.read_bytes()
    shb = next(b for t, b in _blocks(raw) if t == 0x0A0D0D0A)
    comment = _options(shb[24:-4])[1]
    assert comment.startswith("colo-compare 0.1.0 replay: ") and DIVERGE[0] in comment
    assert "compare timeout 3000 ms" in comment and "ignoring dns.id" in comment
    assert "re-timed onto the primary's timeline" in comment
    stamps = []
    with open(ev, "rb") as f:
        for ts, _buf in dpkt.pcapng.Reader(f):
            stamps.append(ts)
    p_times = [ts for ts, _ in _capture_times(DIVERGE[0])]
    s_times = [ts for ts, _ in _capture_times(DIVERGE[1])]
    # every frame is on the primary's clock (the captures are 654,321 s apart)
    assert all(min(p_times) - 1 <= ts <= max(p_times) + 1 for ts in stamps)
    assert min(s_times) - max(p_times) > 600_000
    # each secondary frame keeps its own time in its comment
    epbs = [dpkt.pcapng.EnhancedPacketBlockLE(b) for t, b in _blocks(raw) if t == 6]
    secondary = [e for e in epbs if e.iface_id == 1]
    texts = [next(o.text for o in e.opts if o.code == 1) for e in secondary]
    assert all("captured at 17956543" in t for t in texts)
    assert "secondary frame 9 of its capture" in texts[1] and "TTL 300 vs 299" in texts[1]


def _capture_times(path):
    with open(path, "rb") as f:
        return [(ts, buf) for ts, buf in dpkt.pcap.Reader(f)]


# -- the options every command shares -------------------------------------------------------

def test_debug_is_accepted_after_the_command(capsys, tmp_path):
    code, out, err = run(capsys, "replay", "--debug", *DIVERGE, "-q")
    assert code == 1 and err == ""
    code, out, err = run(capsys, "stats", str(tmp_path / "missing.json"), "--debug")
    assert code == 2 and "missing.json" in err
    # and it does what it says: a traceback for trouble, before or after
    r = subprocess.run([sys.executable, "-m", "colo_cli", "stats", str(tmp_path / "missing.json"),
                        "--debug"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" in r.stderr
    r = subprocess.run([sys.executable, "-m", "colo_cli", "stats", str(tmp_path / "missing.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["replay", "serve", "stats"])
def test_quiet_verbose_color_and_debug_on_every_command(command):
    from colo_cli.cli import cli
    names = {opt for p in cli.commands[command].params for opt in getattr(p, "opts", [])}
    assert {"-q", "--quiet", "-v", "--verbose", "--color", "--debug"} <= names


def test_stats_quiet_prints_nothing_and_verbose_shows_the_histogram(capsys, tmp_path):
    code, out, _ = run(capsys, "replay", "--json", *DIVERGE)
    report = tmp_path / "r.json"
    report.write_text(out)
    code, out, err = run(capsys, "stats", "-q", str(report))
    assert (code, out, err) == (0, "", "")
    code, out, _ = run(capsys, "stats", "-q", str(tmp_path / "none.json"))
    assert code == 2 and out == ""
    code, out, _ = run(capsys, "stats", "-v", str(report), "--color", "never")
    assert "Hold time histogram (cumulative)" in out
    assert "16.384" in out and "+Inf" in out


def test_hexdump_means_the_same_in_serve_and_replay():
    from colo_cli.cli import cli
    replay_opt = next(p for p in cli.commands["replay"].params if p.name == "hexdump_limit")
    serve_opt = next(p for p in cli.commands["serve"].params if p.name == "hexdump_limit")
    assert type(replay_opt.type) is type(serve_opt.type)
    for value, want in (("3", 3), ("0", 0), ("all", None)):
        assert replay_opt.type.convert(value, None, None) == serve_opt.type.convert(value, None, None) == want


# -- shell completion ---------------------------------------------------------------------

def _complete(words, cword, cwd):
    env = {**os.environ, "_COLO_COMPARE_COMPLETE": "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(cword)}
    return subprocess.run([sys.executable, "-m", "colo_cli"], capture_output=True, text=True,
                          env=env, cwd=cwd).stdout


@pytest.mark.parametrize("words, cword", [("colo-compare replay exa", 2),
                                           ("colo-compare replay a.pcap exa", 3),
                                           ("colo-compare stats exa", 2)])
def test_file_arguments_complete_as_file_names(words, cword):
    # click answers "file" and the shell's own file completion does the rest
    out = _complete(words, cword, ROOT)
    assert out.splitlines() == ["file,exa"], out


# -- frame numbers through the timeline ---------------------------------------------------------

class FakeReader:
    """Records as a capture reader yields them: (number, ts_ns, data, orig_len, linktype)."""
    def __init__(self, records):
        self.records = records

    def __iter__(self):
        return iter(self.records)


def test_frame_numbers_survive_skipped_packets_and_held_timestamps():
    from colo_cli.replay import FrameNumbers, Selection, SideInfo, _timeline
    s = 10**9
    frame = udp_frame(b"x")
    # numbers 2, 3, 7, 8, 9 (the reader skipped 1 and 4-6); frame 8's timestamp
    # is a year ahead of its neighbours: held, then taken as the time before
    records = [(2, 1 * s, frame, 60, 1), (3, 2 * s, frame, 60, 1), (7, 3 * s, frame, 60, 1),
               (8, 3 * s + 365 * 86400 * s, frame, 60, 1), (9, 4 * s, frame, 60, 1)]
    numbers = FrameNumbers()
    info = SideInfo("fake")
    out = list(_timeline(FakeReader(records), info, 0, Selection(), numbers))
    assert [rel for rel, *_ in out] == [0, s, 2 * s, 2 * s, 3 * s]
    assert [numbers(i) for i in range(5)] == [2, 3, 7, 8, 9]
    assert any("frame 8: its timestamp is" in w for w in info.warnings)
    # a capture read whole: nothing recorded, numbers are index + 1
    plain = FrameNumbers()
    list(_timeline(FakeReader([(n, n * s, frame, 60, 1) for n in range(1, 1001)]),
                   SideInfo("plain"), 0, Selection(), plain))
    assert plain(0) == 1 and plain(999) == 1000 and len(plain._starts) == 0
