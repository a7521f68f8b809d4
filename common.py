"""What every entry point shares, and nothing else: a leaf module (it imports no other module of this project).

  * Config dataclasses as command lines: `opt` (a field with its --help text, choices and peer aliases),
    `config_parser` / `parse_config` (`--config FILE` included), `ArgumentParser` (one line for a bad command line).
  * `CACHE`: the folder of everything built or converted once (tiny models and pipelines, embedded images).
  * Files: `atomic_write` (the one way a file is replaced: a kill leaves the old one or the new one, never half),
    `atomic_dir` (likewise for a folder built once: the tiny models and pipelines) and `built_once`, `read_jsonl`, `append_jsonl`, `write_jsonl`, `wait_for_file`.
  * Seeds: `derive_seed`, the one rule for every derived seed, and `Stream`, the named namespace of each use.
  * `Dist` and the collectives the phases use (`torchrun` processes; a single process needs none of them).
"""
from __future__ import annotations

import argparse
import difflib
import enum
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
import types
import typing
import uuid
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields

import numpy as np
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("SYN_GRPO_CACHE", os.path.join(ROOT, ".cache"))


# ----------------------------------------------------------------------------------------------------
# Config dataclasses as command lines. Each entry point has one config dataclass; every field is a --flag whose
# --help is the field's own text, with its choices and default.


def opt(default, help: str, choices=None, aliases: tuple = ()):
    """A config field with its --help text (and the values it accepts: argparse rejects any other); `aliases` are the
    peers' names for it (TRL's --num-iterations for --mu), accepted as flags and as --config keys."""
    return field(default=default, metadata={"help": help, "choices": choices, "aliases": aliases})


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help, unless the help states it already
    (a default that depends on the device reads "(default: ...)" in the text, not a second "(default: None)")."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "") or action.default in (None, "", argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


# The peers' settings that have no flag of that name here, and what takes their place (TRL, transformers' Trainer)
PEER_SETTINGS = {
    "per_device_train_batch_size": "--batch-size (it counts prompts, each with --num-generations completions; TRL "
                                   "counts completions)",
    "gradient_accumulation_steps": "--batch-size and --micro-batch (a step's prompts are split into micro-batches)",
    "logging_steps": "nothing: every step is logged",
    "bf16": "--device (bf16 on cuda, float32 on cpu)",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one line for a bad command line (not the usage of 60 flags), exit status 2, and a suggestion for
    a misspelt flag or a peer's setting that has another name here."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            hints = [self.suggest(w) for w in message.split(":", 1)[1].split() if w.startswith("-")]
            message += "".join(f"; {h}" for h in hints if h)
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:                          # a misspelt value or subcommand: the nearest of the choices
            near = difflib.get_close_matches(choice[1], re.findall(r"'([^']*)'", choice[2]), n=1, cutoff=0.6)
            message += f"; did you mean {near[0]!r}?" if near else ""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def suggest(self, name: str) -> str | None:
        """What was probably meant by an unknown flag or --config key `name`."""
        key = name.split("=")[0].lstrip("-").replace("-", "_")
        if key in PEER_SETTINGS:
            return f"for {key} use {PEER_SETTINGS[key]}"
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        near = difflib.get_close_matches("--" + key.replace("_", "-"), flags, n=1, cutoff=0.75)
        return f"did you mean {near[0]}?" if near else None


class ConfigParser(ArgumentParser):
    """The command line of a config dataclass, with `--config FILE`: a YAML or JSON mapping of field names (or
    their aliases, - or _) to values. The file's values replace the defaults and flags given beside it override the
    file; a run's own config.json is a valid FILE. The file's values are typed and checked as the flags are."""

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default="")
        known, _ = pre.parse_known_args(args)
        if known.config:
            self.set_defaults(**self.config_file_values(known.config))
        return super().parse_known_args(args, namespace)

    def config_file_values(self, path: str) -> dict:
        import yaml
        try:
            with open(path) as f:
                raw = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        except (OSError, ValueError, yaml.YAMLError) as e:
            self.error(f"--config {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        if not isinstance(raw, dict):
            self.error(f"--config {path}: expected a mapping of field: value, got {type(raw).__name__}")
        by_name = {s.lstrip("-").replace("-", "_"): a for a in self._actions for s in a.option_strings
                   if s.startswith("--") and a.dest not in ("help", "config")}
        out = {}
        for key, value in raw.items():
            action = by_name.get(str(key).replace("-", "_"))
            if action is None:
                hint = self.suggest(str(key))
                self.error(f"--config {path}: unknown field {key!r}" + (f" ({hint})" if hint else ""))
            out[action.dest] = self._typed(action, value, f"--config {path}: {key}")
        return out

    def _typed(self, action, value, where: str):
        """A value from the file as the flag would have parsed it (YAML reads 1e-6 as a string: converted here)."""
        if value is None:
            return None                      # "resolved later", as in a run's config.json
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                self.error(f"{where}: expected true or false, got {value!r}")
            return value
        if action.nargs == "+":
            values = tuple(str(v) for v in (value if isinstance(value, list) else [value]))
            bad = [v for v in values if action.choices and v not in action.choices]
            if bad:
                self.error(f"{where}: {bad[0]!r} is not one of {', '.join(map(str, action.choices))}")
            return values
        try:
            if isinstance(value, bool) or (action.type is int and isinstance(value, float)):
                raise ValueError
            typed = action.type(value) if action.type else value
        except (TypeError, ValueError):
            self.error(f"{where}: invalid {getattr(action.type, '__name__', 'value')} value {value!r}")
        if action.choices and typed not in action.choices:
            self.error(f"{where}: {typed!r} is not one of {', '.join(map(str, action.choices))}")
        return typed


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One --flag per field of the dataclass `cls`: bools get --x / --no-x, `T | None` takes a T, tuples take 1+."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        t = hints[f.name]
        if isinstance(t, types.UnionType):                      # `T | None`: None means "resolved later"
            t = next(a for a in t.__args__ if a is not type(None))
        default = f.default if f.default is not MISSING else f.default_factory()
        kw = dict(default=default, help=f.metadata.get("help", ""))
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(t) in (tuple, list) or t in (tuple, list):
            kw.update(nargs="+", type=str)
        else:
            kw["type"] = t
        parser.add_argument("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()), dest=f.name, **kw)


def config_parser(cls, description: str = "", epilog: str = "", skip=()) -> ConfigParser:
    """The command line of the dataclass `cls`; an entry point may add flags of its own (actions, not config) and
    positionals in place of the fields named in `skip`."""
    p = ConfigParser(description=description, epilog=epilog)
    p.add_argument("--config", default="", metavar="FILE", help="a YAML or JSON file of field: value (a run's "
                   "config.json is one); flags given beside it override it")
    add_config_arguments(p, cls, skip=skip)
    return p


def config_from(cls, namespace):
    """The dataclass `cls` from parsed arguments (flags that are not its fields are left out)."""
    a = {f.name: getattr(namespace, f.name) for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in a.items()})


def parse_config(cls, argv=None, description: str = "", epilog: str = ""):
    """Parse a command line into the dataclass `cls` (unknown flags and values outside `choices` exit with one line)."""
    return config_from(cls, config_parser(cls, description, epilog).parse_args(argv))


def split_list(value: str) -> list[str]:
    """A comma-separated flag value as its items ('' = none)."""
    return [v.strip() for v in value.split(",") if v.strip()]


# ----------------------------------------------------------------------------------------------------
# Files


@contextmanager
def atomic_write(path: str, mode: str = "w", fsync: bool = False):
    """Open a unique temporary file beside `path`, yield it, then rename it over `path`: a kill at any moment
    leaves either the old file or the new one (os.replace is atomic), and a failure removes the temporary file.
    The name is unique, so threads writing the same path never share one. fsync: survive a power loss too."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", path)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def built_once(path: str, build, marker: str = "config.json") -> str:
    """`path`, made by `build(path)` the first time it is asked for: the tiny models, pipelines, segmenter and
    verifier, random weights built offline and cached (each build writes through `atomic_dir`, so a folder with
    its `marker` file is a finished one)."""
    if not os.path.exists(os.path.join(path, marker)):
        build(path)
    return path


@contextmanager
def atomic_dir(path: str):
    """Yield a fresh temporary folder beside `path` to build into, then rename it to `path`: a reader never sees a
    half-built folder. If another process finished the same folder first, theirs is kept and this one removed."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".build-")
    try:
        yield tmp
        os.rename(tmp, path)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def output_problem(flag: str, path: str, folder: bool = False) -> str | None:
    """Why `path` cannot take a program's output (a folder when `folder`, else a file), or None: checked before any
    work, so that a mistyped path is one line at the start, not a traceback at the end."""
    if folder:
        return f"{flag} {path}: a file, not a folder" if os.path.isfile(path) else None
    if os.path.isdir(path):
        return f"{flag} {path}: a folder; give the file to write"
    parent = os.path.dirname(os.path.abspath(path))
    return None if os.path.isdir(parent) else f"{flag} {path}: its folder {parent} does not exist"


def stop_at_first(prog: str, problems) -> None:
    """Stop the program with one line, the first problem of `problems` (each None, False, '' or the reason)."""
    for problem in problems:
        if problem:
            raise SystemExit(f"{prog}: {problem}")


def code_commit() -> str:
    """The commit this code is at, marked -dirty when tracked files differ from it ('unknown' outside git): what a
    measured number is stamped with."""
    import subprocess
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except OSError:   # no git here
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty else "")


def device_exists(device: str) -> bool:
    """cpu, or cuda / cuda:K of a visible GPU."""
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    return device == "cpu" or bool(m) and int(m[1] or 0) < torch.cuda.device_count()


def read_jsonl(path: str, skip_bad: bool = False) -> list[dict]:
    """The rows of a JSON Lines file. skip_bad: a line that is not JSON (a torn last line of a killed writer) is
    dropped instead of raising."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if not skip_bad:
                    raise
    return rows


def write_jsonl(path: str, rows) -> None:
    """Replace `path` with these rows, atomically."""
    with atomic_write(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def append_jsonl(path: str, rows: list[dict], fsync: bool = False) -> None:
    """Append rows to a JSONL log. A torn last line (its writer killed mid-line) is ended first, so that it cannot
    swallow the first new row."""
    if not rows:
        return
    torn = False
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        if torn:
            f.write("\n")
        f.writelines(json.dumps(r) + "\n" for r in rows)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def wait_for_file(path: str, timeout: float, alive=lambda: True) -> bool:
    """Wait until `path` exists (a server's port file); False when `timeout` seconds pass or `alive()` turns False."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if not alive() or time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


# ----------------------------------------------------------------------------------------------------
# Seeds: functions of (--seed, stream, ...), so that a resumed run needs no sampler state and no two uses of
# randomness share a stream

SEED_STRIDE = 1_000_003   # a prime


class Stream(enum.IntEnum):
    """What a derived seed is for: the first part of every derived seed, so that two uses can never meet (before
    these, the --max-samples subset, epoch 1's order and step 1's sampling all drew from derive_seed(seed, 1))."""
    DATA_ORDER = 1        # (epoch): the permutation of the pool in that epoch
    SUBSET = 2            # (): the --max-samples subset
    SAMPLING = 3          # (step): the step's sampling (vLLM; each prompt then derives its own from it)
    PROMPT_SAMPLING = 4   # (step, slot): a prompt's own sampling under --prompt-seeds
    SYNTHESIS_JOB = 5     # (step, prompt): the data server's noise for that prompt's image
    OFFLINE_JOB = 6       # (sample): the offline baseline's noise for that sample's image


def derive_seed(seed: int, *parts: int) -> int:
    """The one rule for every derived seed: (seed, a, b) -> (seed * S + a) * S + b, S = SEED_STRIDE, below 2^63.
    From --seed the first part is a Stream."""
    for p in parts:
        seed = seed * SEED_STRIDE + int(p)
    return seed % 2 ** 63


# ----------------------------------------------------------------------------------------------------
# Distributed: `torchrun --nproc_per_node N train.py ...` runs N copies of the trainer, FSDP2-sharded (gloo on CPU,
# nccl on GPU). Rank r takes a contiguous 1/N of each step's B prompts with all their G completions, so groups never
# straddle ranks and rewards / advantages need no communication; FSDP averages the gradients. Rank 0 alone logs,
# checkpoints and talks to the data server(s), and broadcasts pool updates.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), world)


def rank_share(n: int, d: Dist) -> range:
    """The contiguous part of n items that rank d.rank handles (n must divide evenly)."""
    return range(d.rank * n // d.world, (d.rank + 1) * n // d.world)


def mean_over_ranks(row: dict, d: Dist) -> dict:
    """Metrics of one step, averaged over ranks (each rank holds the same number of prompts)."""
    if d.world == 1:
        return row
    rows = all_gather(row, d)
    out = {}
    for k, v in row.items():   # numbers are averaged over the ranks that have one (None: a metric undefined there)
        nums = [r[k] for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        out[k] = float(np.mean(nums)) if k != "step" and nums else v
    return out


def broadcast(obj, d: Dist):
    """Rank 0's object on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj, d: Dist) -> list:
    """Every rank's object, in rank order, on every rank."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(x: float, d: Dist) -> float:
    """The sum of x over every rank."""
    if d.world == 1:
        return x
    t = torch.tensor([float(x)])
    torch.distributed.all_reduce(t)
    return t.item()
