"""The documentation cannot drift from the program: every option is in its
manual page, the pages are clean under mandoc, the README's commands are the
ones CI runs, and the example captures are what their generator writes."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from colo_cli import __version__
from colo_cli.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"serve": "colo-compare-serve.1", "replay": "colo-compare-replay.1",
         "stats": "colo-compare-stats.1"}


def _roff_text(page: str) -> str:
    text = (ROOT / "man" / page).read_text()
    return text.replace("\\-", "-").replace("\\e", "\\")


def _option_names(command: click.Command) -> list[str]:
    names = []
    for param in command.params:
        if isinstance(param, click.Option):
            names.extend(param.opts)
    return names


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_option_is_in_its_manual_page(name):
    command = cli.commands[name]
    text = _roff_text(PAGES[name])
    missing = [opt for opt in _option_names(command) + ["--help"] if opt not in text]
    assert not missing, f"{PAGES[name]} does not mention {missing}"


def test_top_level_options_in_the_main_page():
    text = _roff_text("colo-compare.1")
    for opt in _option_names(cli) + ["--help"]:
        assert opt in text, opt
    for name in PAGES:
        assert f"colo-compare-{name}" in text


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_command_documents_its_defaults_in_the_page(name):
    """Each option with a default shown in --help has that default in the page."""
    command = cli.commands[name]
    text = _roff_text(PAGES[name])
    for param in command.params:
        if isinstance(param, click.Option) and param.show_default and param.default not in (None, False):
            default = param.default
            shown = str(int(default)) if isinstance(default, float) and default.is_integer() else str(default)
            # find the option's paragraph and look for the default in it
            opt = param.opts[-1]
            start = text.index(opt, text.index(".SH OPTIONS"))
            paragraph = text[start:text.find(".TP", start + 1)]
            assert shown in paragraph, f"{PAGES[name]}: {opt} default {shown} not in its paragraph"


def test_pages_carry_the_version():
    for page in list(PAGES.values()) + ["colo-compare.1"]:
        head = (ROOT / "man" / page).read_text().splitlines()[0]
        assert f'"colo-compare {__version__}"' in head, page


@pytest.mark.skipif(shutil.which("mandoc") is None, reason="mandoc not installed (apt-get install mandoc)")
@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "man").glob("*.1")))
def test_pages_are_clean_under_mandoc_lint(page):
    r = subprocess.run(["mandoc", "-Tlint", "-Wstyle", str(ROOT / "man" / page)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def _readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\n+```sh\n(.*?)\n```", text, re.S)
    assert m, f"README has no {marker} block"
    return m.group(1)


def test_readme_has_the_two_setup_commands_and_ci_runs_them():
    demo = _readme_command("demo-command")
    test = _readme_command("test-command")
    assert "venv" in demo and "colo-compare replay examples/match-" in demo
    assert "examples/diverge-" in demo
    assert "venv" in test and "pytest" in test and "[test]" in test
    ci = (ROOT / ".ci" / "run").read_text()
    assert "demo-command" in ci and "test-command" in ci and "qemu-system-x86" in ci
    assert "tshark" in ci        # tests/test_frame_numbers.py: Wireshark's numbers


def test_ci_extracts_exactly_the_readme_commands():
    script = (ROOT / ".ci" / "run").read_text()
    awk = re.search(r"awk -v marker=.*?' README.md", script, re.S).group(0).replace(" README.md", "")
    for marker in ("demo-command", "test-command"):
        r = subprocess.run(["bash", "-c", awk.replace("$1", marker) + f" {ROOT / 'README.md'}"],
                           capture_output=True, text=True)
        assert r.stdout.strip() == _readme_command(marker)


def test_example_captures_are_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_examples.py"), str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("match-primary", "match-secondary", "diverge-primary", "diverge-secondary"):
        assert (tmp_path / f"{name}.pcap").read_bytes() == (ROOT / "examples" / f"{name}.pcap").read_bytes()


def test_readme_quotes_the_real_replay_output(capsys):
    """The tour's replay output is what the diverging examples really print."""
    from colo_cli.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(ROOT / "examples" / "diverge-primary.pcap"),
              str(ROOT / "examples" / "diverge-secondary.pcap"), "--hexdump", "2", "--color", "never"])
    assert exc.value.code == 1
    real = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    readme = (ROOT / "README.md").read_text()
    block = readme.split("$ colo-compare replay examples/diverge-primary.pcap", 1)[1].split("```", 1)[0]
    quoted = [line.rstrip() for line in block.splitlines()[1:]]
    # the README shows paths relative to the repository
    real = [line.replace(str(ROOT) + "/", "") for line in real]
    assert [l for l in quoted if l] == [l for l in real if l]


def test_shell_completion_scripts_and_answers(monkeypatch, capsys):
    from colo_cli.cli import main
    for shell in ("bash", "zsh", "fish"):
        with pytest.raises(SystemExit) as exc:
            main(["completion", shell])
        assert exc.value.code == 0
        assert "_COLO_COMPARE_COMPLETE" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "colo_cli"], capture_output=True, text=True,
                       env={**__import__("os").environ, "_COLO_COMPARE_COMPLETE": "bash_complete",
                            "COMP_WORDS": "colo-compare replay --no", "COMP_CWORD": "2"})
    assert "--normalize-seq" in r.stdout and "--no-timeout" in r.stdout
    assert "completion" in _roff_text("colo-compare.1")


def _readme_block_after(command_line: str) -> list[str]:
    """The non-empty lines the README shows after ``$ command_line``, up to
    the end of its code block (or the next ``$`` line)."""
    readme = (ROOT / "README.md").read_text()
    assert command_line in readme, command_line
    block = readme.split(command_line, 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines()[1:]:
        if line.startswith("$ "):
            break
        if line.strip():
            lines.append(line.rstrip())
    return lines


def _real_lines(capsys, argv, code):
    from colo_cli.cli import main
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--color", "never"])
    assert exc.value.code == code
    out = capsys.readouterr().out.replace(str(ROOT) + "/", "")
    return [line.rstrip() for line in out.splitlines() if line.strip()]


def test_readme_quotes_the_real_learn_noise_output(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    quoted = _readme_block_after(
        "$ colo-compare replay tests/replicas/equal-a.pcap tests/replicas/equal-b.pcap --learn-noise")
    real = _real_lines(capsys, ["replay", "tests/replicas/equal-a.pcap", "tests/replicas/equal-b.pcap",
                                "--learn-noise"], 0)
    assert quoted == real


def test_readme_quotes_the_real_planted_byte_miscompare(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    quoted = _readme_block_after("$ colo-compare replay tests/replicas/diverge-a.pcap")
    line = [l for l in quoted if l.startswith("Miscompare 1 of 1")]
    real = _real_lines(capsys, ["replay", "tests/replicas/diverge-a.pcap", "tests/replicas/diverge-b.pcap",
                                "--normalize-seq", "--ignore", "icmp:8-19", "--ignore", "dns.id",
                                "--evidence", str(tmp_path / "diff.pcapng")], 1)
    assert len(line) == 1 and line[0] in real


def test_readme_quotes_the_real_stats_of_a_report(capsys, monkeypatch, tmp_path):
    from colo_cli.cli import main
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["replay", "--json", "examples/diverge-primary.pcap", "examples/diverge-secondary.pcap"])
    (tmp_path / "report.json").write_text(capsys.readouterr().out)
    monkeypatch.chdir(tmp_path)
    quoted = _readme_block_after("$ colo-compare stats report.json")
    assert quoted == _real_lines(capsys, ["stats", "report.json"], 0)


def test_readme_quotes_the_real_version(capsys):
    """Same form; the Python and dpkt versions are those of the machine."""
    from colo_cli.cli import main
    with pytest.raises(SystemExit):
        main(["--version"])
    real = capsys.readouterr().out.strip()
    form = r"colo-compare (\S+) \(Python (\S+), dpkt (\S+), core (compiled with mypyc|pure Python: .+)\)"
    quoted = re.fullmatch(form, _readme_block_after("$ colo-compare --version")[0])
    assert quoted and re.fullmatch(form, real)
    assert quoted.group(1) == __version__


def test_the_code_cites_documents_a_clone_has():
    """Docstrings and comments cite docs/ pages that exist, never the
    developers' notes outside the repository (a user's clone has none)."""
    cited = set()
    for path in sorted((ROOT / "colo_cli").rglob("*.py")):
        text = path.read_text()
        assert "capture-pitfalls" not in text and "shared/" not in text, path
        assert not re.search(r"\bspec/qemu", text), path
        cited.update(re.findall(r"docs/[\w-]+\.md", text))
    assert {"docs/captures.md", "docs/qemu.md"} <= cited
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, missing


def test_the_readmes_layout_names_every_module():
    """Every module and package of colo_cli has its line in the README's
    Layout section (its one purpose)."""
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("## ", 1)[0]
    names = [p.name for p in (ROOT / "colo_cli").iterdir()
             if (p.suffix == ".py" and not p.name.startswith("__"))
             or (p.is_dir() and (p / "__init__.py").exists())]
    missing = sorted(n for n in names if n not in layout)
    assert not missing, f"README's Layout does not name {missing}"
    for module in (ROOT / "colo_cli" / "capture").glob("*.py"):
        assert module.name.startswith("__") or module.name in layout, module.name
