"""The try-it page of `h2po serve` (GET /try on the model's deployment): pick seed titles (with completion), add
constraints, and see the model's list beside EASE's and the two-tower's. The Jinja2 template escapes every string
from data; the page's script (static/try.js) fills the lists with `textContent`, so a title carrying markup shows
as text and never runs. Scripts and styles come from the server only (the dashboard's Content-Security-Policy).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import jinja2

from serving.lists import Lister, constraint_choices

TEMPLATES = Path(__file__).parent / "templates"


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_try_page(lister: Lister, rivals: dict[str, str]) -> str:
    """The page for the served `lister`; `rivals`: {name: route} of the rivals served beside it."""
    choices = constraint_choices(lister.catalog)
    columns = [{"name": "h2po", "url": "retrieve"}] + [{"name": name, "url": f"{route}/retrieve"}
                                                       for name, route in rivals.items()]
    return environment().get_template("try.html").render(
        catalog=lister.catalog.name, checkpoint=Path(lister.source).name, facts=lister.facts, columns=columns,
        choices={**choices, "k": lister.default_k, "max_k": lister.max_k})
