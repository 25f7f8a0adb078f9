"""A Griffe extension (mkdocs.yml, mkdocstrings `extensions:`) for two docstring conventions.

- Sphinx roles (:class:`UNetConfig`, :meth:`~diffunet.Diffusion.sample`): Markdown would show
  the role text, so each becomes inline code of the name (`~` keeps the last component, as in
  Sphinx).
- Several parameters described together in an `Args:` section (`context, labels: ...`): the
  Google-style parser wants one name per entry, so each name gets its own (a long description
  is given once, the other names refer to the first).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc):`(~?)([^`]+)`")
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params|Keyword Args|Other Parameters):\s*$")
_NAMES = re.compile(r"^(\s+)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)(\s*\([^)]*\))?:(\s.*)?$")


def _as_code(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_shared_entries(text: str) -> str:
    """Split an `a, b: description` entry of a parameter section into one entry per name."""
    lines, out, i = text.split("\n"), [], 0
    section: int | None = None  # the indentation of the current section's header
    while i < len(lines):
        line = lines[i]
        if _SECTION.match(line):
            section = _indent(line)
        elif line.strip() and section is not None and _indent(line) <= section:
            section = None
        match = _NAMES.match(line) if section is not None else None
        if match is None:
            out.append(line)
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() and _indent(lines[end]) > _indent(line):
            end += 1
        indent, names, kind, rest = match.groups()
        first, *others = re.split(r"\s*,\s*", names)
        out.append(f"{indent}{first}{kind or ''}:{rest or ''}")
        out.extend(lines[i + 1 : end])
        short = end == i + 1 and len(rest or "") <= 80
        for name in others:  # a short description again, a long one by reference
            out.append(f"{indent}{name}{kind or ''}:{rest if short else f' as `{first}`.'}")
        i = end
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles and shared parameter entries in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Called for each object Griffe loads; edits its docstring in place."""
        if obj.docstring is None:
            return
        text = _ROLE.sub(_as_code, obj.docstring.value)
        obj.docstring.value = split_shared_entries(text)
