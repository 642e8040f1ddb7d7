"""The README and docs/ against the code: every command names a script and flags that exist, every picture a page
shows is in the repository, and the configuration reference is the one the Config dataclasses generate.

A command is checked by running the script's own `main` with its arguments up to the point where the command line
is parsed (`utils.parse_config`, which every script calls, and which runs the Config's checks), then stopping: the
flags, their values' types and ranges, the `--config` files and the extra flags (--resume, --sample, ...) are checked
as the user's shell would have them, and nothing trains.
"""
import glob
import importlib
import os
import re
import shlex
import sys

import pytest

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import config_reference  # noqa: E402  (scripts/ is not a package)

PAGES = sorted([os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))])
SHELL_ENDS = {"&&", "||", "|", ";", ">", ">>", "2>&1", "&"}


def page_name(path):
    return os.path.relpath(path, ROOT)


def code_text(markdown):
    """The text of the page's fenced code blocks and inline code spans, with backslash line continuations joined."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", markdown, flags=re.S)
    rest = re.sub(r"```.*?```", "", markdown, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", rest)
    return [re.sub(r"\\\n\s*", " ", block) for block in blocks] + spans


def commands(markdown):
    """(script, args) of every `python <script>.py ...` command of a page; args stop at a shell operator or '#'."""
    found = []
    for text in code_text(markdown):
        for line in text.splitlines():
            line = line.split(" # ")[0].strip()
            match = re.search(r"(?:^|\s|&&\s*)python\s+((?:scripts/)?\w+\.py)(\s.*)?$", line)
            if not match:
                continue
            try:
                words = shlex.split(match.group(2) or "")
            except ValueError:  # an unbalanced quote: the span was cut by the markdown, not a command
                continue
            args = []
            for word in words:
                if word in SHELL_ENDS or word.startswith(("#", ">", "2>")):
                    break
                if word != "...":  # "..." stands for the user's other flags
                    args.append(word)
            found.append((match.group(1), args))
    return found


ALL_COMMANDS = sorted({(page_name(page), script, tuple(args))
                       for page in PAGES for script, args in commands(open(page).read())})


class Parsed(Exception):
    """Raised in place of running the script once its command line parsed."""


def check_command_line(monkeypatch, script, args):
    """Run `script`'s main(args) until its command line is parsed; argparse's errors and the Config's checks fail
    the test. Every module imports parse_config at its top (tests/test_layout.py), so patching the modules loaded
    once the script is imported reaches every caller."""
    real = utils.parse_config

    def parse_then_stop(*a, **kw):
        real(*a, **kw)
        raise Parsed

    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    for loaded in list(sys.modules.values()):
        if getattr(loaded, "parse_config", None) is real:
            monkeypatch.setattr(loaded, "parse_config", parse_then_stop)
    with pytest.raises(Parsed):
        module.main(list(args))


def test_the_pages_hold_commands():
    """The extraction finds the README's own commands (a broken regex would check nothing)."""
    readme = [c for c in ALL_COMMANDS if c[0] == "README.md"]
    assert ("README.md", "ddpm_conditional.py", ("--config", "configs/quick_cpu.json")) in readme
    assert len(ALL_COMMANDS) >= 20


@pytest.mark.parametrize("page,script,args", ALL_COMMANDS, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_command_names_a_script_and_flags_that_exist(monkeypatch, page, script, args):
    monkeypatch.chdir(ROOT)  # --config paths are relative to the repository, as in the pages
    assert os.path.isfile(os.path.join(ROOT, script)), f"{page}: python {script}: no such script"
    try:
        check_command_line(monkeypatch, script, args)
    except SystemExit as exit_:  # argparse: 0 after --help; else an unknown flag or a value of the wrong type
        if exit_.code != 0:
            pytest.fail(f"{page}: python {script} {' '.join(args)}: the command line does not parse "
                        f"(exit {exit_.code})")


def test_a_wrong_flag_is_caught(monkeypatch):
    """The check fails a command with a flag the script does not have, or a value of the wrong type."""
    monkeypatch.chdir(ROOT)
    for args in (["--no_such_flag", "1"], ["--max_steps", "many"]):
        with pytest.raises(SystemExit):
            check_command_line(monkeypatch, "ddpm_conditional.py", args)


def test_the_check_leaves_no_module_with_the_stub(monkeypatch):
    """After a check, every module has the real parse_config back (else a later test that trains would stop at its
    parse, whatever order pytest runs the files in)."""
    monkeypatch.chdir(ROOT)
    with monkeypatch.context() as patched:  # the stub's patches end with this block
        check_command_line(patched, "ddpm_conditional.py", ["--config", "configs/quick_cpu.json"])
    assert utils.parse_config.__name__ == "parse_config"
    stubbed = [name for name, loaded in list(sys.modules.items())
               if callable(getattr(loaded, "parse_config", None)) and loaded.parse_config.__name__ == "parse_then_stop"]
    assert stubbed == []


def test_a_value_the_script_refuses_is_caught(monkeypatch):
    """The check runs the Config's checks too: a value of the right type that the script cannot use fails."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(utils.UsageError, match="sampler 'nope' is unknown"):
        check_command_line(monkeypatch, "ddpm_conditional.py", ["--sampler", "nope"])


def images(markdown):
    """Paths of the pictures a page shows: ![alt](path) and <img src="path">, without web addresses."""
    paths = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", markdown) + re.findall(r"<img[^>]*src=\"([^\"]+)\"", markdown)
    return [path for path in paths if not re.match(r"https?://", path)]


def links(markdown):
    """Targets of the page's [text](target) links to files of the repository, without their #anchor."""
    targets = re.findall(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)", markdown)
    return [target.split("#")[0] for target in targets
            if not re.match(r"(https?|mailto):", target) and not target.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_picture_and_page_a_page_links_to_exists(page):
    markdown = open(page).read()
    here = os.path.dirname(page)
    missing = [path for path in images(markdown) if not os.path.isfile(os.path.join(here, path))]
    assert not missing, f"{page_name(page)} shows pictures that are not in the repository: {missing}"
    dead = [path for path in links(markdown) if not os.path.exists(os.path.join(here, path))]
    assert not dead, f"{page_name(page)} links to files that are not in the repository: {dead}"


def test_the_configuration_reference_is_generated_from_the_configs():
    with open(os.path.join(ROOT, config_reference.PATH)) as f:
        written = f.read()
    assert written == config_reference.render(), (
        f"{config_reference.PATH} is out of date: run python scripts/config_reference.py")


def test_the_link_checks_read_markdown():
    """Pictures and file links are found; web addresses and in-page anchors are not files to check."""
    page = '[a](docs/x.md#part) ![i](results/p.png) [w](https://example.org) [s](#section) <img src="q.png">'
    assert links(page) == ["docs/x.md"]
    assert images(page) == ["results/p.png", "q.png"]
