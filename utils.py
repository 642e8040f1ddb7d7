"""Shared helpers: errors and CLI, config parsing, seeding and device, image files and grids, FLOPs, torch files.

The data sets are in data.py.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import re
import sys
import textwrap
import types
import typing

import numpy as np
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from matplotlib.figure import Figure
from PIL import Image


# ----------------------------------------------------------------------------- errors and CLI

class UsageError(ValueError):
    """Bad user input. The message is one line naming the problem and the fix."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))


def short_reason(exc, limit=160):
    """First line of an exception's message, cut to `limit` characters."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cli(main_fn, argv=None):
    """Call `main_fn(argv)`; turn a UsageError or FileNotFoundError into one stderr line and exit 2."""
    try:
        main_fn(argv)
    except (UsageError, FileNotFoundError) as exc:
        print(f"error: {short_reason(exc, limit=1000)}", file=sys.stderr)
        sys.exit(2)


def from_pretrained(cls, name, **kwargs):
    """`cls.from_pretrained(name)`; failing to load is a one-line UsageError."""
    advice = "the weights must be downloaded once with internet access, or pass a local folder"
    if name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise UsageError(f"could not load '{name}' (no such folder): {advice}")
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise UsageError(f"could not load '{name}' ({short_reason(exc, 200)}): {advice}") from exc


# ----------------------------------------------------------------------------- configuration

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def arg(default, help, *, resumable=False, old_names=(), absent=dataclasses.MISSING):
    """A config field with its help text; a list default is copied for every instance.

    resumable: the field may change when a run is resumed (how long it runs, how it logs; never what it learns).
    old_names: names the field had before, which still parse from flags and config files (with a note) and are read
    from configs saved under them. absent: what a run saved before the field existed used, where it is not the default.
    """
    metadata = {"help": help, "resumable": resumable, "old_names": tuple(old_names), "absent": absent}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def configclass(*groups):
    """Make a script's Config: a dataclass of its own annotated fields, then the fields of each group in `groups`.

    A group is a dataclass of fields declared once (config.py), with an optional `validate(self)`. A plain
    `name = value` in the class body sets the default of a group's field `name`, its type and help staying the
    group's. `validate()` of the result runs each group's checks, in order, then the class's own `validate`.
    """
    def make(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        fields = [(name, kind, cls.__dict__.get(name, dataclasses.MISSING)) for name, kind in own.items()]
        hints = {}
        for group in groups:
            hints.update(typing.get_type_hints(group))
            for field in dataclasses.fields(group):
                if field.name in own:
                    raise TypeError(f"{cls.__name__}.{field.name} is a field of {group.__name__}: set its default "
                                    f"with `{field.name} = value`, or name the new field otherwise")
                default = vars(cls).get(field.name, _field_default(field))
                fields.append((field.name, hints[field.name], _copy_field(field, default)))
        names = [name for name, _, _ in fields]
        unknown = [name for name, value in vars(cls).items() if name not in names and not name.startswith("_")
                   and not name.isupper() and not callable(value) and not isinstance(value, (classmethod, property))]
        if unknown:
            raise TypeError(f"{cls.__name__} sets {unknown[0]}, which is no field of its groups")
        checks = [group.validate for group in groups if "validate" in vars(group)]
        if "validate" in vars(cls):
            checks.append(vars(cls)["validate"])

        def validate(self):
            """Check every field: one UsageError line that names the value and the fix."""
            for check in checks:
                check(self)
            return self

        namespace = {key: value for key, value in vars(cls).items() if key not in names and key not in
                     ("__annotations__", "__dict__", "__weakref__")}
        namespace["validate"] = validate
        return dataclasses.make_dataclass(cls.__name__, fields, namespace=namespace)

    return make


def _copy_field(field, default):
    """A new dataclass field with `field`'s metadata and the given default."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=field.metadata)
    return dataclasses.field(default=default, metadata=field.metadata)


def parse_bool(text):
    """Parse true/false/1/0/yes/no (any case) into a bool."""
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}: use true or false")


def _unwrap_optional(tp):
    """Split `X | None` / `Optional[X]` into (X, True); any other type into (type, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported config field type {tp}")
        return inner[0], True
    return tp, False


def _optional(parse):
    """Wrap a parser so that 'none' (any case) gives None."""
    def parse_optional(text):
        return None if text.strip().lower() == "none" else parse(text)
    parse_optional.__name__ = parse.__name__
    return parse_optional


def _field_default(field):
    """The default of a dataclass field, or MISSING."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def old_names(cls):
    """{old name: field name} of a Config's renamed fields; an old name that is a field of its own is not one."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    return {old: f.name for f in fields for old in f.metadata.get("old_names", ()) if old not in names}


def _add_field(parser, field, tp, flag=None):
    """Add the `--<name>` flag (or `flag`, an old name) for one dataclass field; its value only appears when given."""
    inner, optional = _unwrap_optional(tp)
    default = _field_default(field)
    shown = "required" if default is dataclasses.MISSING else f"default: {default}"
    help_text = f"{field.metadata.get('help', '')} ({shown})".strip().replace("%", "%%")
    kwargs = {"default": argparse.SUPPRESS, "help": help_text if flag is None else argparse.SUPPRESS}
    if flag is not None:
        kwargs["dest"] = f"old:{flag}"
    if typing.get_origin(inner) is list and typing.get_args(inner) == (str,):
        kwargs.update(action="append", type=str, metavar="STR")
    elif inner in (int, float, str):
        parse = _optional(inner) if optional else inner
        kwargs.update(type=parse, metavar=inner.__name__.upper())
    elif inner is bool:
        parse = _optional(parse_bool) if optional else parse_bool
        kwargs.update(type=parse, nargs="?", const=True, metavar="BOOL")
    else:
        raise TypeError(f"config field {field.name!r} has unsupported type {tp}")
    parser.add_argument(f"--{flag or field.name}", **kwargs)


def _renamed_note(old, new, where):
    print(f"note: {where}{old} is now {new}; the old name still works", file=sys.stderr)


def _coerce_json(name, value, tp, path):
    """Check a value read from a JSON config file against the field type (ints allowed as floats)."""
    inner, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    origin = typing.get_origin(inner) or inner
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, origin) and not (origin in (int, float) and isinstance(value, bool))
    if origin is list:
        ok = ok and all(isinstance(v, str) for v in value)
    if not ok:
        kind = getattr(inner, "__name__", str(inner)) if origin is not list else "a list of strings"
        raise UsageError(f"config file '{path}': {name} should be {kind}, got {value!r}: fix the value")
    return value


def read_json_object(path, what="file"):
    """The JSON object (dict) stored in `path`; anything else is a UsageError that names `what` and the path."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{what} '{path}' is not valid JSON ({short_reason(exc)}): fix or remove it") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{what} '{path}' must hold a JSON object of field names to values: fix or remove it")
    return data


def _read_config_file(path, fields, hints, renamed):
    """Read a JSON object of overrides whose keys must be field names (or their old names)."""
    if not os.path.isfile(path):
        raise UsageError(f"config file '{path}' not found: pass --config an existing JSON file")
    data = read_json_object(path, "config file")
    names = [f.name for f in fields]
    overrides = {}
    for key, value in data.items():
        if key in renamed:
            _renamed_note(key, renamed[key], f"config file '{path}': ")
        elif key not in names:
            raise UsageError(f"config file '{path}' has unknown key '{key}': "
                             f"valid keys are {', '.join(names)}")
        name = renamed.get(key, key)
        overrides[name] = _coerce_json(name, value, hints[name], path)
    return overrides


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the script's docstring as written and shows every default."""


def parse_config(cls, argv=None, description=None, extra=None):
    """Build a `cls` dataclass instance from defaults, then each `--config FILE` in order, then flags; then run its
    `validate()`, where it has one.

    `extra` is a list of `(flag, argparse_kwargs)` for arguments that are not config fields; when
    given, the result is `(config, namespace_of_extras)`, whose `given` is the set of field names that a
    config file or a flag set (the others hold their defaults). A field's old name (see `arg`) still parses, with a
    note on stderr.
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    renamed = old_names(cls)
    parser = argparse.ArgumentParser(
        description=description, allow_abbrev=False,
        formatter_class=_HelpFormatter)
    parser.add_argument("--config", metavar="FILE", action="append", default=[],
                        help="JSON file of overrides (keys = field names); may be repeated, later files and "
                             "flags given here win")
    for field in fields:
        _add_field(parser, field, hints[field.name])
    by_name = {f.name: f for f in fields}
    for old, name in renamed.items():
        _add_field(parser, by_name[name], hints[name], flag=old)
    extra_dests = [parser.add_argument(flag, **kwargs).dest for flag, kwargs in (extra or ())]
    namespace = parser.parse_args(argv)

    values = {f.name: _field_default(f) for f in fields}
    given = set()
    for path in namespace.config:
        overrides = _read_config_file(path, fields, hints, renamed)
        values.update(overrides)
        given.update(overrides)
    flagged = {}
    for old, name in renamed.items():
        if hasattr(namespace, f"old:{old}"):
            _renamed_note(f"--{old}", f"--{name}", "")
            flagged[name] = getattr(namespace, f"old:{old}")
    flagged.update({f.name: getattr(namespace, f.name) for f in fields if hasattr(namespace, f.name)})
    values.update(flagged)
    given.update(flagged)
    missing = [name for name, value in values.items() if value is dataclasses.MISSING]
    if missing:
        parser.error("missing " + ", ".join(f"--{name}" for name in missing))
    config = cls(**values)
    if hasattr(config, "validate"):
        config.validate()
    if extra is None:
        return config
    return config, argparse.Namespace(given=given, **{dest: getattr(namespace, dest) for dest in extra_dests})


def config_to_dict(cfg):
    """The config as a plain dict."""
    return dataclasses.asdict(cfg)


def _atomic_write(path, write):
    """Call `write(file)` on `path + '.tmp'`, fsync, then rename over `path`; clean up on failure."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_config(cfg, path):
    """Write the config as pretty JSON, atomically."""
    write_json(config_to_dict(cfg), path)


def write_json(obj, path):
    """Write any JSON-able object as pretty JSON, atomically."""
    text = json.dumps(obj, indent=2) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def saved_config(saved, cls):
    """A config dict saved by an earlier run, in the fields of `cls` today: each field under an old name (see `arg`)
    takes its new one, and each field the run had no value for takes what runs without it used (its `absent`, else
    its default). Configs written before a field existed or was renamed stay loadable and resumable."""
    renamed = old_names(cls)
    filled = {renamed.get(key, key): value for key, value in saved.items()}
    for field in dataclasses.fields(cls):
        if not field.init or field.name in filled:
            continue
        absent = field.metadata.get("absent", dataclasses.MISSING)
        value = _field_default(field) if absent is dataclasses.MISSING else absent
        if value is not dataclasses.MISSING:
            filled[field.name] = value
    return filled


def resumable_fields(cls):
    """The names of the fields of `cls` that may change when a run is resumed (see `arg`)."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable")}


def diff_configs(saved, current, ignore=()):
    """Lines like `lr: 0.0003 (saved) != 0.001 (now)` for every key whose value differs."""
    keys = list(current) + [k for k in saved if k not in current]
    lines = []
    for key in keys:
        if key in ignore:
            continue
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if old != new:
            lines.append(f"{key}: {old!r} (saved) != {new!r} (now)")
    return lines


# ----------------------------------------------------------------------------- seeding and device

def seed_everything(seed):
    """Seed Python's `random`, NumPy's global generator and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """The RNG states as plain lists and tensors, which weights_only loading accepts."""
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [np_key.tolist(), np_pos, np_has_gauss, np_gauss],
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np_key, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(np_key, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU that was visible at the save; restore those that are visible now (a box with fewer
        # GPUs, or CUDA_VISIBLE_DEVICES, has fewer). torch.cuda.set_rng_state_all would index past the last one.
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def use_tf32(enabled):
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (cuDNN's convolutions default to on, cuBLAS's
    matmuls to off): both on, as training runs, or both off for IEEE float32."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def pick_device(name="auto"):
    """'auto' -> cuda, else mps, else cpu; otherwise check that the requested device exists."""
    mps_ok = torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    kind, _, index = name.partition(":")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": mps_ok}
    if kind in available and not available[kind]:
        raise UsageError(f"device '{name}' requested but {kind} is not available: "
                         "use --device cpu or --device auto")
    if kind not in ("cpu", "cuda", "mps") or (index and not (kind != "cpu" and index.isdigit())):
        raise UsageError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UsageError(f"device '{name}' does not exist: {torch.cuda.device_count()} GPU(s) are visible; use "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}, or check CUDA_VISIBLE_DEVICES")
    return name


# ----------------------------------------------------------------------------- images and plots

def load_rgb(path):
    """Open any image as 8-bit RGB (16-bit and 32-bit grey are scaled, transparency is dropped)."""
    with Image.open(path) as image:
        if image.mode.startswith("I") or image.mode == "F":
            scale = 257 if image.mode.startswith("I") else 1
            grey = np.clip(np.asarray(image, dtype=np.float64) / scale, 0, 255)
            return Image.fromarray(grey.round().astype(np.uint8)).convert("RGB")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        return image.convert("RGB")


def is_readable_image(path):
    """True when `path` has an image extension and PIL can parse it."""
    if not path.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS):
        return False
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:
        return False


def to_uint8(x):
    """Float tensor in [-1, 1] -> uint8 in 0..255."""
    return ((x.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)


def _as_uint8(images):
    """Accept uint8 images as they are; convert float images from [-1, 1]."""
    images = images.detach().cpu()
    return images if images.dtype == torch.uint8 else to_uint8(images)


def _pil_format(path):
    """PIL format name from the file extension."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
    if ext not in formats:
        raise UsageError(f"cannot save images as '{path}': use a .png or .jpg file name")
    return formats[ext]


def _to_pil(image):
    """uint8 (C, H, W) tensor -> PIL RGB or L image."""
    array = image.permute(1, 2, 0).numpy()  # (C, H, W) -> (H, W, C)
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


GRID_MIN_SIZE = 64  # grids scale smaller images up to at least this many pixels (nearest neighbour)


def upscale(images, min_size=GRID_MIN_SIZE):
    """uint8 (N, C, H, W) -> the same pixels repeated k x k, with the smallest integer k that gives H >= min_size."""
    factor = max(1, math.ceil(min_size / images.shape[-2]))
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def grid_labels(num_classes, n_per_row, labels=None, device=None):
    """The class ids of a grid, n_per_row of each of `labels` (None: every class), one grid row per class:
    (len(labels) * n_per_row,). A label outside the model's classes is a UsageError."""
    labels = list(range(num_classes)) if labels is None else labels
    for label in labels:
        if not 0 <= label < num_classes:
            raise UsageError(f"label {label} is outside the model's {num_classes} classes: use 0..{num_classes - 1}")
    return torch.tensor(labels, dtype=torch.long, device=device).repeat_interleave(n_per_row)  # (L,) -> (L * n,)


def save_images(images, path, nrow=None, captions=None, min_size=GRID_MIN_SIZE):
    """Save (N, C, H, W) images as a grid (padding 2) of `nrow` images per row.

    Images smaller than min_size pixels are scaled up by an integer factor, nearest neighbour, so a 16 px run
    gives a grid a person can see (save_individual keeps the unscaled images); min_size=1 keeps every pixel as
    it is. With `captions`, one per grid row, each row has its caption written above it.
    """
    images = upscale(_as_uint8(images), min_size)
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    rows = [images[i:i + nrow] for i in range(0, len(images), nrow)]
    if captions is not None and len(captions) != len(rows):
        raise ValueError(f"{len(captions)} captions for {len(rows)} grid rows")
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2)
    if captions is not None:
        if len(images) == 1:  # make_grid returns a lone image without its padding
            grid = torch.nn.functional.pad(grid, (2, 2, 2, 2))
        grid = _caption_rows(_to_pil(grid), captions, row_height=images.shape[-2] + 2)
    else:
        grid = _to_pil(grid)
    fmt = _pil_format(path)
    _atomic_write(path, lambda f: grid.save(f, format=fmt))


def _caption_rows(grid, captions, row_height, strip=14):
    """The grid with a white strip of `strip` pixels above each row of images, holding that row's caption."""
    from PIL import ImageDraw

    out = Image.new("RGB", (grid.width, grid.height + strip * len(captions)), "white")
    draw = ImageDraw.Draw(out)
    max_chars = max(8, grid.width // 6)  # PIL's default bitmap font is about 6 px per character
    grid = grid.convert("RGB")
    for i, caption in enumerate(captions):  # row i: its top padding and its images
        top = i * (row_height + strip)
        draw.text((3, top + 1), textwrap.shorten(caption, max_chars, placeholder="..."), fill="black")
        out.paste(grid.crop((0, i * row_height, grid.width, (i + 1) * row_height)), (0, top + strip))
    out.paste(grid.crop((0, grid.height - 2, grid.width, grid.height)), (0, out.height - 2))  # the bottom padding
    return out


def save_figure(fig, path, dpi=100):
    """Save a matplotlib Figure as a PNG, atomically."""
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def save_gif(frames, path, seconds_per_frame=0.1):
    """Save (N, C, H, W) images as an animated GIF that loops, atomically; the last frame is held for a second."""
    pictures = [_to_pil(frame) for frame in _as_uint8(frames)]
    durations = [round(1000 * seconds_per_frame)] * (len(pictures) - 1) + [1000]  # milliseconds
    _atomic_write(path, lambda f: pictures[0].save(f, format="GIF", save_all=True, append_images=pictures[1:],
                                                   duration=durations, loop=0))


def save_individual(images, labels, out_dir):
    """Write each image to `out_dir/<label>_<i>.png`, i counting within each label; return the paths."""
    images = _as_uint8(images)
    os.makedirs(out_dir, exist_ok=True)
    counts, paths = {}, []
    for image, label in zip(images, labels, strict=True):
        label = int(label)
        index = counts.get(label, 0)
        counts[label] = index + 1
        path = os.path.join(out_dir, f"{label}_{index}.png")
        _to_pil(image).save(path)
        paths.append(path)
    return paths


def plot_loss(losses, path, smooth=100, quality=()):
    """Plot the raw loss (faint) and its moving average over `smooth` steps, log y axis, as a PNG.

    With `quality` (dicts of step, class_accuracy, judge_fd: training's --eval_every), a second panel shows them.
    """
    losses = np.asarray(losses, dtype=np.float64)
    fig = Figure(figsize=(12, 4) if quality else (6, 4))
    if quality:
        _plot_quality(fig.add_subplot(1, 2, 2), quality)
    ax = fig.add_subplot(1, 2 if quality else 1, 1)
    ax.plot(np.arange(len(losses)), losses, alpha=0.3, linewidth=0.8, label="loss")
    window = min(smooth, len(losses))
    if window > 1:
        average = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(losses)), average, label=f"mean of {window} steps")
    if len(losses) and (losses > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _plot_quality(ax, quality):
    """Class accuracy (left axis, if measured) and the judge-space Frechet distance (right axis) against the step."""
    steps = [q["step"] for q in quality]
    accuracy = [q["class_accuracy"] for q in quality]
    if all(a is not None for a in accuracy):
        ax.plot(steps, accuracy, marker="o", color="tab:green", label="class accuracy")
        ax.set_ylim(0, 1)
        ax.set_ylabel("class accuracy (judge)")
    distance = ax.twinx()
    distance.plot(steps, [q["judge_fd"] for q in quality], marker="s", color="tab:purple", label="judge FD")
    distance.set_ylabel("judge-space Frechet distance (not FID)")
    handles = ax.get_legend_handles_labels()[0] + distance.get_legend_handles_labels()[0]
    distance.legend(handles=handles, fontsize=8)
    ax.set_xlabel("step")
    ax.set_title("sample quality (EMA weights)", fontsize=10)


# ----------------------------------------------------------------------------- FLOPs
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels; these add the CPU one (QK^T and AV are 4 N^2 d per head).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


def count_flops(fn):
    """FLOPs of everything fn() runs (a multiply-add counts 2)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- torch files

def atomic_save(obj, path):
    """`torch.save` to `path + '.tmp'`, fsync, rename: a crash never leaves a half-written `path`."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with `weights_only=True`; a missing or unreadable file is a UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' not found: check the path or train a model first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        message = str(exc)
        if "Unsupported global" in message:
            found = re.search(r"GLOBAL (\S+)", message)
            found = found.group(1) if found else "non-tensor"
            raise UsageError(f"checkpoint '{path}' holds a {found} object, which weights_only loading "
                             "refuses: store only tensors, numbers, strings, lists and dicts "
                             "(e.g. dataclasses.asdict)") from exc
        reason = message.split("WeightsUnpickler error:")[-1]
        raise UsageError(f"checkpoint '{path}' is not a readable PyTorch checkpoint "
                         f"(truncated or another format): {short_reason(reason)}") from exc
