"""`tierbase masking images|refresh`: the masked images of sensitive tiers (app_images.py).

A masked branch of a tier that keeps an image is a clone of that image; these commands show how
current each image is and let a platform engineer re-make one (the platform does it after each
promotion, rule change and on its schedule).
"""

from __future__ import annotations

from typing import Any

import click

from .base import as_json, client, command
from .render import emit_json, human_bytes, out


@click.group()
def masking() -> None:
    """Masked images: what masked branches of a sensitive tier are cloned from."""


def image_line(img: dict[str, Any]) -> str:
    """One image in a line: `tierbase masking images` and `tierbase status` print it alike."""
    if not img.get("branch"):
        return f"{img['tier']}: no masked image yet"
    stale = img.get("staleness_s")
    age = "-" if stale is None else f"{float(stale):.0f} s"
    how = str(img.get("mode") or "-")
    if img.get("mode") == "incremental":
        how += f", {img.get('rows_remasked') or 0} rows re-masked"
    elif img.get("why"):
        how += f" ({img['why']})"
    return (f"{img['tier']}: {img['branch']} ({'current' if img.get('current') else 'stale'}), data {age} old, "
            f"last made {how}, own bytes {human_bytes(img.get('bytes'))}")


@masking.command("images")
@command
@click.pass_context
def masking_images(ctx: click.Context) -> None:
    """Each masked image: its tier, how it was last made, how stale its data is, its own bytes."""
    got = client(ctx).masked_images()
    if as_json():
        emit_json(got)
        return
    for img in got or []:
        out.print(image_line(img))
    if not got:
        out.print('no tier keeps a masked image (declare `image = ["production"]` in [masking])')


@masking.command("refresh")
@click.argument("tier", required=False)
@click.option("--full", is_flag=True, help="Mask the tier's data whole, even when only rows changed.")
@command
@click.pass_context
def masking_refresh(ctx: click.Context, tier: str | None, full: bool) -> None:
    """Re-make the masked image of TIER (default: every tier that keeps one); platform engineers only.

    Incremental when it can be: only the rows that changed since the last image are re-masked."""
    got = client(ctx).refresh_masked_images(tier, full=full)
    if as_json():
        emit_json(got)
        return
    for r in got:
        how = (f"{r['rows_remasked']} rows re-masked" if r["mode"] == "incremental" else f"masked whole: {r['why']}")
        out.print(f"{r['tier']}: {r['image']} made in {r['seconds']} s ({r['mode']}, {how}; "
                  f"freezing took {r.get('freeze_s') or 0} s)")
