"""The options every command shares, defined once so the same thing has the same name everywhere.

``MODEL`` is a positional argument, the output is ``-o/--output``, ``--force`` replaces an existing
output, ``--json`` prints one JSON object on stdout, ``-q/--quiet`` and ``-v/--verbose`` set the
log level on every subcommand, and ``--progress/--no-progress`` shows progress bars (default:
only when stderr is a terminal and ``-q`` is not given, so logs and pipes get no bar noise).

Old spellings (``--out``, ``--model``) still parse for one release: they are hidden options
whose value is moved onto the new one, with one ``warning: ... is deprecated`` line on stderr.
Options whose settings are a dataclass are generated from it (:func:`dataclass_options`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from typing import Any, Callable, Iterable, get_args, get_origin, get_type_hints

import click

#: The release that drops the deprecated spellings (they work, with a warning, until then).
REMOVED_IN = "0.3.0"

#: ``ctx.meta`` keys (shared by the group's and the subcommand's contexts).
_QUIET = "nestpatch.quiet"
_VERBOSE = "nestpatch.verbose"

F = Callable[..., Any]


def deprecation_line(old: str, new: str) -> None:
    """The one stderr line an old spelling prints (the command then runs as with the new one)."""
    click.echo(f"warning: {old} is deprecated, use {new} (removed in {REMOVED_IN})", err=True)


# ------------------------------------------------------------------------------------ deprecated aliases


def _given(value: Any) -> bool:
    return value is not None and value != () and value is not False


def deprecated_alias(old: str, dest: str, new: str, **option_kw: Any) -> Callable[[F], F]:
    """Accept the hidden spelling ``old`` for the parameter ``dest`` (shown to users as ``new``).

    The old value replaces ``dest``'s when ``dest`` was not given; giving both differently is a
    usage error. A wrapper, not a click callback, moves the value: callbacks run in parse order,
    the wrapper after all of them.
    """
    hidden = "deprecated_" + old.lstrip("-").replace("-", "_") + "_for_" + dest

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = kwargs.pop(hidden, None)
            if _given(value):
                deprecation_line(old, new)
                current = kwargs.get(dest)
                if _given(current) and current != value:
                    raise click.UsageError(f"{old} and {new} both given; use {new} only")
                kwargs[dest] = value
            return f(*args, **kwargs)

        return click.option(old, hidden, hidden=True, default=None, **option_kw)(wrapper)

    return decorate


def _require(dest: str, what: str) -> Callable[[F], F]:
    """Fail like click's own "Missing ..." when ``dest`` is still unset after the aliases moved."""

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not _given(kwargs.get(dest)):
                raise click.UsageError(f"Missing {what}.")
            return f(*args, **kwargs)

        return wrapper

    return decorate


# ----------------------------------------------------------------------------------- shared options


def model_argument(*, required: bool = True, old_option: bool = False) -> Callable[[F], F]:
    """The positional ``MODEL`` (a path or a named model); ``old_option``: ``--model`` still parses.

    With the old option, click cannot require the positional (the value may come as ``--model``),
    so the requirement is checked after the alias moved its value.
    """

    def decorate(f: F) -> F:
        if old_option and required:
            f = _require("model", "argument 'MODEL'")(f)
        if old_option:
            f = deprecated_alias("--model", "model", "the positional MODEL", type=str)(f)
        return click.argument("model", type=str, required=required and not old_option)(f)

    return decorate


def output_option(dest: str = "out", *, required: bool = False, help: str = "Output path.", old: Iterable[str] = ("--out",),
                  **path_kw: Any) -> Callable[[F], F]:
    """``-o/--output PATH`` into parameter ``dest``; each spelling in ``old`` still parses, deprecated."""
    old = tuple(old)

    def decorate(f: F) -> F:
        if required:
            f = _require(dest, "option '-o' / '--output'")(f)
        for spelling in old:
            f = deprecated_alias(spelling, dest, "-o/--output", type=click.Path(**path_kw))(f)
        text = help + ("  [required]" if required else "")
        return click.option("-o", "--output", dest, type=click.Path(**path_kw), default=None, help=text)(f)

    return decorate


def json_option(help: str = "Print one JSON object on stdout (nothing else goes to stdout).") -> Callable[[F], F]:
    """``--json`` into parameter ``as_json``."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def force_option(help: str = "Replace an existing output.") -> Callable[[F], F]:
    """``--force`` into parameter ``force``."""
    return click.option("--force", is_flag=True, help=help)


def show_progress(flag: bool | None) -> bool:
    """Whether to draw progress bars: the explicit flag, else off under ``-q``, else only on a terminal.

    A bar on a non-terminal stderr (a log file, CI) is a stream of carriage returns, so "auto"
    means ``sys.stderr.isatty()``.
    """
    if flag is not None:
        return flag
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get(_QUIET):
        return False
    return sys.stderr.isatty()


def progress_option(f: F) -> F:
    """``--progress/--no-progress`` into parameter ``progress``, resolved to a bool by :func:`show_progress`."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["progress"] = show_progress(kwargs.get("progress"))
        return f(*args, **kwargs)

    return click.option("--progress/--no-progress", "progress", default=None,
                        help="Progress bars on stderr (default: only when stderr is a terminal and -q is not given).")(wrapper)


# ------------------------------------------------------------------------------------------ verbosity


def apply_log_level(ctx: click.Context) -> None:
    """Set the root log level from the ``-q``/``-v`` seen so far (group and subcommand add up)."""
    quiet, verbose = ctx.meta.get(_QUIET, False), ctx.meta.get(_VERBOSE, 0)
    level = logging.ERROR if quiet and not verbose else logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")  # a no-op once configured
    logging.getLogger().setLevel(level)


def _on_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    ctx.meta[_QUIET] = ctx.meta.get(_QUIET, False) or bool(value)
    apply_log_level(ctx)


def _on_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    ctx.meta[_VERBOSE] = ctx.meta.get(_VERBOSE, 0) + (value or 0)
    apply_log_level(ctx)


def verbosity_params() -> list[click.Option]:
    """Fresh ``-q/--quiet`` and ``-v/--verbose`` options (not passed to the command function)."""
    return [
        click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_on_quiet,
                     help="Only errors on stderr, no progress bars (results still print)."),
        click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_on_verbose,
                     help="More logging (-v info, -vv debug)."),
    ]


def add_verbosity(command: click.Command) -> None:
    """Give ``command`` (and every subcommand of a group) ``-q`` and ``-v``, unless it has them."""
    have = {o for p in command.params for o in getattr(p, "opts", [])}
    if "-q" not in have and "-v" not in have:
        command.params.extend(verbosity_params())
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_verbosity(sub)


def quiet() -> bool:
    """Was ``-q`` given (to the group or the command)?"""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(_QUIET))


def print_json(obj: Any) -> None:
    """The one JSON object a ``--json`` command prints (non-ASCII escaped, so no control character reaches the terminal)."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------- dataclass options
#
# A field's ``metadata`` says how its flag looks (every key optional):
#
#   help         the help text                      choices      allowed values (click.Choice)
#   flag         the spelling ("--judge"; a bool: "--x/--no-x", or one "--x" that sets it, or with
#                negate=True one "--no-x"/"--in-process" that clears it; flag_help: that flag's text)
#   min, max     a number range (click.IntRange / FloatRange; on list items: checked by the dataclass)
#   path         "file" or "dir" (click.Path of that kind; exists=True: it must exist)
#   split        False: a repeatable list whose values are not split on commas (values with commas)
#   cli_default  the CLI's default where the library's differs (shown, and applied when not given)
#   show_default False: no "[default: ...]" (the help says what happens)
#   metavar      the value's name in --help
#   cli          False: not a flag (a library-only setting)
#   prefix       on a field that is itself a dataclass: its fields become flags named PREFIX + field


def field_specs(cls: type, exclude: Iterable[str] = ()) -> list[tuple[str, Any, Any, dict]]:
    """``(name, type hint, default, metadata)`` of each field of dataclass ``cls`` (minus ``exclude``), in order."""
    skip = set(exclude)
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append((f.name, hints[f.name], default, dict(f.metadata)))
    return out


def _strip_optional(hint: Any) -> Any:
    args = get_args(hint)
    if args and type(None) in args:
        return [a for a in args if a is not type(None)][0]
    return hint


def _range(typ: Any, meta: dict) -> Any:
    if "min" not in meta and "max" not in meta:
        return typ
    rng = click.IntRange if typ is int else click.FloatRange
    return rng(meta.get("min"), meta.get("max"))


def param_type(hint: Any, meta: dict) -> tuple[Any, bool]:
    """click type and whether the option repeats, from a field's type hint (``X | None`` is ``X``) and metadata."""
    hint = _strip_optional(hint)
    origin, args = get_origin(hint), get_args(hint)
    multiple = origin in (list, tuple)
    base = args[0] if multiple and args else hint
    if meta.get("choices"):
        return click.Choice([str(c) for c in meta["choices"]]), multiple
    if meta.get("path"):
        kind = meta["path"]
        return click.Path(file_okay=kind != "dir", dir_okay=kind != "file", exists=bool(meta.get("exists"))), multiple
    typ = {int: int, float: float, str: str, bool: bool}.get(base, str)
    return (typ if multiple or typ in (str, bool) else _range(typ, meta)), multiple


def _show_default(default: Any) -> str:
    if default is None or default == "" or default == [] or default == ():
        return "none" if default is None else ""
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default))
    return str(default)


def flag_of(name: str, meta: dict) -> str:
    """The flag a field's option is spelled as (the first, for a ``--x/--no-x`` pair)."""
    return str(meta.get("flag") or "--" + name.replace("_", "-")).split("/")[0]


def _specs(cls: type, exclude: Iterable[str], choices: dict[str, tuple] | None) -> list[tuple[str, Any, Any, dict]]:
    """Each flag's ``(parameter name, hint, default, metadata)``: a ``prefix`` field is replaced by its own fields
    (``metadata["parent"]``/``["field"]`` say where the value goes); ``cli=False`` fields are left out."""
    out = []
    for n, h, d, m in field_specs(cls, exclude):
        if m.get("cli", True) is False:
            continue
        if m.get("prefix") is not None and dataclasses.is_dataclass(_strip_optional(h)):
            for sn, sh, sd, sm in _specs(_strip_optional(h), (), None):
                out.append((m["prefix"] + sn, sh, sd, {**sm, "parent": n, "field": sn}))
            continue
        out.append((n, h, d, m))
    if choices:
        out = [(n, h, d, {**m, "choices": choices[n]} if n in choices else m) for n, h, d, m in out]
    return out


def option_names(cls: type, exclude: Iterable[str] = ()) -> list[str]:
    """The parameter names :func:`dataclass_options` gives ``cls``'s flags (nested fields with their prefix)."""
    return [n for n, _, _, _ in _specs(cls, exclude, None)]


def dataclass_options(cls: type, *, exclude: Iterable[str] = (), help: dict[str, str] | None = None,
                      choices: dict[str, tuple] | None = None) -> Callable[[F], F]:
    """One click option per field of dataclass ``cls`` (defaults ``None``: "not given"), shaped by its metadata.

    ``--name-with-dashes`` per field unless ``metadata["flag"]``, ``--x/--no-x`` for booleans,
    repeatable (commas also split) for lists and tuples. Help comes from the field's
    ``metadata["help"]`` or ``help[name]``; choices from ``metadata["choices"]`` or ``choices[name]``
    (the other metadata keys: the comment above). Read the given values back with
    :func:`dataclass_overrides`, or build the dataclass with :func:`dataclass_from_options`.
    """
    specs = _specs(cls, exclude, choices)
    extra = help or {}

    def decorate(f: F) -> F:
        for name, hint, default, meta in reversed(specs):
            flag = meta.get("flag") or "--" + name.replace("_", "-")
            typ, multiple = param_type(hint, meta)
            shown = _show_default(meta.get("cli_default", default)) if meta.get("show_default", True) else ""
            text = meta.get("help") or extra.get(name, "")
            kw: dict[str, Any] = {"metavar": meta["metavar"]} if meta.get("metavar") else {}
            if typ is bool and "/" not in flag and meta.get("flag"):  # one flag: sets the field (or clears it: negate)
                text = meta.get("flag_help", text)
                f = click.option(flag, name, is_flag=True, default=False, help=text)(f)
                continue
            text += f"  [default: {shown}]" if shown else ""
            if typ is bool:
                flag = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
                if shown in ("True", "False"):  # name the default's flag, as click does
                    text = text.replace(f"[default: {shown}]", f"[default: {flag.split('/')[shown == 'False'].strip()[2:]}]")
                f = click.option(flag, name, default=None, help=text)(f)
            elif multiple:  # numbers are typed after the comma split (dataclass_overrides), so "1,2" parses
                typ = typ if isinstance(typ, (click.Choice, click.Path)) else str
                how = " (repeatable)" if meta.get("split") is False else " (repeatable; commas also split)"
                f = click.option(flag, name, type=typ, multiple=True, help=text + how, **kw)(f)
            else:
                f = click.option(flag, name, type=typ, default=None, help=text, **kw)(f)
        return f

    return decorate


def _typed(items: list[str], typ: Any, name: str, meta: dict) -> list[Any]:
    if typ not in (int, float):
        return items
    try:
        return [typ(x) for x in items]
    except ValueError:
        from ..errors import InputError

        what = "integers" if typ is int else "numbers"
        raise InputError(f"{flag_of(name, meta)} {','.join(items)!r}: expected comma-separated {what} (e.g. 1,2,3)") from None


def dataclass_overrides(cls: type, kwargs: dict, *, exclude: Iterable[str] = (), choices: dict[str, tuple] | None = None) -> dict:
    """The values of :func:`dataclass_options` flags that were given, lists split on commas and typed.

    Keys are parameter names (a nested field's carries its prefix). Keys that are not fields of
    ``cls`` are ignored, so a command can pass all its kwargs.
    """
    out: dict[str, Any] = {}
    for name, hint, _, meta in _specs(cls, exclude, choices):
        value = kwargs.get(name)
        if value is None:
            continue
        typ, multiple = param_type(hint, meta)
        if typ is bool and "/" not in str(meta.get("flag") or "/") and not isinstance(value, tuple):
            if value:  # a one-way flag: given means set (or cleared, with negate)
                out[name] = not meta.get("negate", False)
            continue
        if multiple:
            if not value:
                continue
            parts = (x.strip() for v in value for x in (str(v).split(",") if meta.get("split", True) else [str(v)]))
            items = [x for x in parts if x != ""]
            items = _typed(items, typ, name, meta)
            out[name] = tuple(items) if get_origin(_strip_optional(hint)) is tuple else items
        else:
            out[name] = value
    return out


def dataclass_from_options(cls: type, kwargs: dict, *, exclude: Iterable[str] = (), **fixed: Any) -> Any:
    """Build ``cls`` from a command's parsed values: given flags, else each field's ``cli_default``, else its default.

    ``fixed`` sets fields that do not come from generated flags (e.g. ``progress``).
    """
    specs = _specs(cls, exclude, None)
    values = {n: m["cli_default"] for n, _, _, m in specs if "cli_default" in m}
    values.update(dataclass_overrides(cls, kwargs, exclude=exclude))
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    meta_of = {n: m for n, _, _, m in specs}
    for name, value in values.items():
        m = meta_of[name]
        if "parent" in m:
            nested.setdefault(m["parent"], {})[m["field"]] = value
        else:
            top[name] = value
    hints = get_type_hints(cls)
    for parent, sub in nested.items():
        top[parent] = _strip_optional(hints[parent])(**sub)
    return cls(**{**top, **fixed})
