"""The documentation's commands are true: every `python <program>.py ...` in a bash block of README.md and docs/ parses
with that program's own command line (no unknown flag, no invalid choice, no line that lost its continuation), and
every page the README links to exists."""
import glob
import os
import re
import shlex

import pytest

import config
import data
import eval as E
import synth
from common import ArgumentParser, config_parser
from server import ServerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def bash_commands(path: str) -> list[tuple[int, str]]:
    """(line, command) of every command in the page's ```bash blocks (continuation lines joined) and of every inline
    `python ...` span."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        first = text[:block.start()].count("\n") + 2
        joined, start = "", None
        for k, line in enumerate(block[1].splitlines()):
            start = first + k if start is None else start
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            out.append((start, joined + line))
            joined, start = "", None
    for span in re.finditer(r"`(python [^`]+)`", text):      # inline commands in the prose and tables
        out.append((text[:span.start()].count("\n") + 1, span[1]))
    return out


def program_calls(command: str) -> list[tuple[str, list[str]]]:
    """(program, its arguments) for each python <program>.py in a command line (&&, ;, & and | separate calls);
    optional parts in brackets are left out, a value written ... is taken as given, --config FILE is not read."""
    command = re.sub(r"\[[^\]]*\]", " ", command).replace("...", "X")    # [optional flags], values left open
    calls, current = [], None
    for w in shlex.split(command, comments=True):
        if w in ("&&", ";", "&", "|", "||"):
            current = None
        elif re.fullmatch(r"(\S*/)?(train|eval|server|synth|data)\.py", w):
            current = (os.path.basename(w)[:-3], [])
            calls.append(current)
        elif current is not None:
            current[1].append(w)
    for _, args in calls:
        while "--config" in args:
            i = args.index("--config")
            del args[i:i + 2]
    return calls


def parser_for(program: str, args: list[str]):
    if program == "train":
        return config.command_line()
    if program == "server":
        return config_parser(ServerConfig)
    if program == "synth":
        return synth.command_line()
    if program == "data":
        return data.command_line()
    if args and args[0] == "score":
        args.pop(0)
        return config_parser(E.ScoreConfig)
    if args and args[0] in ("plot", "gallery"):
        p = ArgumentParser(prog=f"eval.py {args.pop(0)}")
        p.add_argument("run_dir")
        return p
    return config_parser(E.EvalConfig)


CALLS = [(os.path.relpath(page, ROOT), line, program, args) for page in PAGES
         for line, command in bash_commands(page) for program, args in program_calls(command)]


def test_the_pages_have_commands_to_check():
    assert len(CALLS) > 50 and {c[2] for c in CALLS} == {"train", "eval", "server", "synth", "data"}


@pytest.mark.parametrize("page,line,program,args", CALLS, ids=[f"{c[0]}:{c[1]}:{c[2]}" for c in CALLS])
def test_every_documented_command_parses(page, line, program, args, capsys):
    if "--help" in args:
        return
    try:
        _, unknown = parser_for(program, args).parse_known_args(args)
    except SystemExit:
        pytest.fail(f"{page}:{line}: {program}.py {' '.join(args)}: {capsys.readouterr().err.strip()}")
    unknown = [u for u in unknown if u != "X"]           # "python train.py ... --eval-data": more flags, left open
    assert not unknown, f"{page}:{line}: {program}.py does not take {unknown}"


def test_no_bash_line_starts_with_a_flag():
    """A flag at the start of a line is a command that lost its trailing backslash (the server loop of an earlier
    README ran each server without its flags and --segmenter as a command)."""
    bad = [f"{os.path.relpath(p, ROOT)}:{n}" for p in PAGES for n, c in bash_commands(p) if c.lstrip().startswith("--")]
    assert not bad, bad


def test_every_linked_page_exists():
    with open(PAGES[0], encoding="utf-8") as f:
        links = re.findall(r"\]\(([^)#]+)\)", f.read())
    assert links and all(os.path.exists(os.path.join(ROOT, link)) for link in links), links
