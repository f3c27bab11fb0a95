"""The ``nestpatch`` command line: a thin click group; each command lives in its own module.

Library code never prints or exits; this layer turns :class:`NestpatchError` into one line on
stderr and exit code 2 (``--debug`` keeps the traceback).
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys

import click

from .. import __version__
from ..errors import NestpatchError

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
    "nestpatch.cli.robustness_cmd",
)


class NestpatchGroup(click.Group):
    """Click group that maps user errors to exit code 2 with one line, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NestpatchError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=NestpatchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nestpatch")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Ship LLM safety updates as tiny, auditable NeST patches."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register_all() -> None:
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # command module not written yet
                continue
            raise
        module.register(cli)


_register_all()


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so atomic writers remove their temporary files.
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    cli(obj={})
