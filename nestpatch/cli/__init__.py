"""The ``nestpatch`` command line: a thin click group; each command lives in its own module.

Library code never prints or exits; this layer turns every user-caused failure into one line
``error: PATH: problem`` on stderr and exit code 2: a :class:`NestpatchError`, an ``OSError``
(full disk, unreadable file, read-only directory), a decoding error, and click's own usage
errors. Ctrl-C exits 130 and SIGTERM 143, after the atomic writers removed their temporary
files. ``--debug`` keeps the traceback.
"""

from __future__ import annotations

import importlib
import signal
import sys

import click

from .. import __version__
from ..errors import NestpatchError
from .options import add_verbosity
from .terminal import error_line

#: Modules that define commands; each exposes ``register(group)``. Add a line to add a command.
COMMAND_MODULES = (
    "nestpatch.cli.format_cmds",
    "nestpatch.cli.fetch_cmd",
    "nestpatch.cli.train_cmd",
    "nestpatch.cli.convert_cmds",
    "nestpatch.cli.runtime_cmds",
    "nestpatch.cli.eval_cmd",
    "nestpatch.cli.audit_cmds",
    "nestpatch.cli.bench_cmd",
    "nestpatch.cli.tune_cmd",
    "nestpatch.cli.select_cmd",
    "nestpatch.cli.robustness_cmd",
)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so ``finally`` blocks and atomic writers unwind."""


def _os_error_message(e: OSError) -> str:
    where = e.filename if e.filename is not None else "output"
    what = e.strerror or str(e)
    if e.filename2 is not None:
        return f"{where} -> {e.filename2}: {what}"
    return f"{where}: {what}"


class NestpatchGroup(click.Group):
    """Click group that maps user errors to exit code 2 with one line, no traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv
        code: int
        try:
            rv = super().main(args=argv, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
            if not standalone_mode:
                return rv
            code = rv if isinstance(rv, int) else 0
        except click.exceptions.Exit as e:  # pragma: no cover - standalone_mode=False returns it
            code = e.exit_code
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            code = 130
        except click.ClickException as e:
            click.echo(error_line(e.format_message()), err=True)
            code = 2
        except NestpatchError as e:
            if debug:
                raise
            click.echo(error_line(e), err=True)
            code = 2
        except OSError as e:
            if debug:
                raise
            click.echo(error_line(_os_error_message(e)), err=True)
            code = 2
        except UnicodeError as e:
            if debug:
                raise
            click.echo(error_line(f"{getattr(e, 'object', b'')[:40]!r}: cannot decode or encode text ({e})"), err=True)
            code = 2
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            code = 130
        except Terminated:
            click.echo("terminated", err=True)
            code = 143
        sys.exit(code)


@click.group(cls=NestpatchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nestpatch")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Ship LLM safety updates as tiny, auditable NeST patches."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register_all() -> None:
    for mod in COMMAND_MODULES:  # a command module that fails to import fails the CLI loudly
        importlib.import_module(mod).register(cli)
    add_verbosity(cli)  # -q/-v on the group and on every command, before or after the command name


_register_all()


def _sigterm(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so atomic writers remove their temporary files; exit 143.
    raise Terminated


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _sigterm)
    cli(obj={})
