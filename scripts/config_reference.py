"""Write docs/configuration.md, the reference of every script's options, from the scripts' Config dataclasses.

    python scripts/config_reference.py          (after a Config field changes; tests/test_docs.py checks it is current)

The page is generated, so it cannot drift from `--help`: the training scripts share one table (a field, its default
in each script that has it, and its help text), and each tool has its own.
"""
import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from utils import arg, old_names, parse_config, run_cli  # noqa: E402  (after the path)


@dataclass
class Config:
    out: str = arg("docs/configuration.md", "the page to write, relative to the repository")


PATH = Config.out
TRAINING = ("ddpm_conditional", "ddpm", "ddpm_img2img", "train_sd", "train_vae")  # one table, a column of defaults each
TOOLS = ("sample", "evaluate", "visualize", "compare", "bench", "gpu_check", "condition_svc")  # a table each

HEADER = """# Configuration reference

Generated from the `Config` dataclasses by `python scripts/config_reference.py`; `tests/test_docs.py` fails when it
is out of date, so it says what `--help` says.

Each script starts with a `Config`: the field groups of `config.py` it is made of (every field declared once, with
one help text and its checks) and its own fields, each with its default and a comment. Every field is also a flag
(`--lr 1e-4`, `--compile true`); `--help` lists them all with their defaults; an unknown flag is an error.
`--config FILE` applies a JSON file of overrides first (repeatable: later files win, and flags win over all).
`None` is given as `--field none`, booleans as `true` or `false` (a bare `--compile` means true). The groups'
checks run when the flags are parsed, before any file is read. The resolved config is printed, written to
`results/<run_name>/config.json` and `models/<run_name>/config.json`, and stored in every `training_state.pt`;
`--resume` refuses a config that differs in anything but the fields marked resumable (the run-length, sampling and
logging fields), and says what differs. The training scripts also take `--resume` (continue from
`models/<run_name>/training_state.pt`) and `--overwrite` (start over); a run refuses to start over a folder that
holds checkpoints unless one of them is given.
"""


def config_fields(name):
    """[(field name, default, help)] of the Config of module `name`, in the order of the dataclass."""
    module = importlib.import_module(name)
    rows = []
    for field in dataclasses.fields(module.Config):
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = field.default
        rows.append((field.name, default, field.metadata.get("help", "")))
    return rows


def shown(value):
    """A default as a user types it after the flag."""
    if value is None:
        return "`None`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[]`" if not value else ", ".join(f"`{item}`" for item in value)
    return f"`{value}`"


def cell(text):
    return str(text).replace("|", "\\|")


def training_table():
    """One row per field of any training script: its default in each script (blank where it has none)."""
    fields = {name: {row[0]: row for row in config_fields(name)} for name in TRAINING}
    order = []
    for name in TRAINING:
        order += [field for field in fields[name] if field not in order]
    lines = ["| field | " + " | ".join(f"`{name}.py`" for name in TRAINING) + " | meaning |",
             "|---" * (len(TRAINING) + 2) + "|"]
    for field in order:
        defaults = [shown(fields[name][field][1]) if field in fields[name] else "" for name in TRAINING]
        meaning = next(fields[name][field][2] for name in TRAINING if field in fields[name])
        lines.append(f"| `{field}` | " + " | ".join(defaults) + f" | {cell(meaning)} |")
    return "\n".join(lines)


def tool_table(name):
    lines = ["| field | default | meaning |", "|---|---|---|"]
    lines += [f"| `{field}` | {shown(default)} | {cell(help)} |" for field, default, help in config_fields(name)]
    return "\n".join(lines)


def renamed_table():
    """One row per old name that still parses: the scripts that take it, and the field it now names."""
    names = {}
    for name in TRAINING + TOOLS:
        module = importlib.import_module(name)
        for old, new in old_names(module.Config).items():
            names.setdefault((old, new), []).append(f"`{name}.py`")
    lines = ["| old name | now | in |", "|---|---|---|"]
    lines += [f"| `{old}` | `{new}` | {', '.join(scripts)} |" for (old, new), scripts in names.items()]
    return "\n".join(lines)


def render():
    """The whole page, as written to PATH."""
    parts = [HEADER, "## The training scripts\n",
             "`ddpm_conditional.py`, `ddpm.py` (unconditional), `train_sd.py` (text-to-image) and `train_vae.py` (the "
             "first stage) share the loop of `training.py`, and most of their fields. A blank cell: the script has "
             "no such field.\n", training_table() + "\n",
             "## Renamed fields\n",
             "A renamed field's old name still parses, as a flag and as a key of a `--config` file, with a one-line "
             "note; configs saved under it (a run's `config.json`, a `training_state.pt`) read as the new one, so "
             "`--resume` and `sample.py` keep working on runs saved before the rename.\n", renamed_table() + "\n"]
    for name in TOOLS:
        script = f"scripts/{name}.py" if name == "gpu_check" else f"{name}.py"
        doc = (importlib.import_module(name).__doc__ or "").strip().splitlines()[0]
        parts += [f"## `{script}`\n", doc + "\n", tool_table(name) + "\n"]
    return "\n".join(parts)


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__)
    text = render()
    with open(os.path.join(ROOT, cfg.out), "w") as f:
        f.write(text)
    print(f"wrote {cfg.out} ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    run_cli(main)
