"""MkDocs hooks of the documentation site (mkdocs.yml `hooks:`).

- Pages from outside docs/: README.md becomes the home page, ARCHITECTURE.md and CHANGELOG.md
  pages of their own, and examples/ one page with every script.
- Links are written for GitHub (`docs/training.md` in the README, `../README.md` in a docs
  page); each is resolved against the file's place in the repository and rewritten to the
  page the site makes of its target, so both renderings work. A target the site does not
  have stays as written and fails the strict build.
- The field table of docs/model.md and the preset table of docs/presets.md are generated from
  the code (between `<!-- generated: NAME -->` and `<!-- /generated -->`), so new fields and
  presets appear without editing a page; preset sizes are counted on the meta device.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import itertools
import logging
import posixpath
import re
import tokenize
from pathlib import Path
from typing import Any

import yaml
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.diffunet")

#: Pages made from files outside docs/: site page → file, relative to the repository root.
ROOT_PAGES = {
    "index.md": "README.md",
    "architecture.md": "ARCHITECTURE.md",
    "changelog.md": "CHANGELOG.md",
    "examples.md": "examples/README.md",
}
#: Repository paths that link to a page the site makes (a folder links to its README's page).
LINK_TARGETS = {path: page for page, path in ROOT_PAGES.items()} | {"examples": "examples.md"}

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")
_GENERATED = re.compile(r"<!-- generated: ([\w-]+) -->.*?<!-- /generated -->", re.S)

_repo = Path(".")


def on_config(config: Any) -> Any:
    """Remember the repository root (the folder of mkdocs.yml)."""
    global _repo
    _repo = Path(config.config_file_path).resolve().parent
    return config


def on_files(files: Files, config: Any) -> Files:
    """Add the pages made from README.md, ARCHITECTURE.md, CHANGELOG.md and examples/."""
    for page, path in ROOT_PAGES.items():
        text = (_repo / path).read_text(encoding="utf-8")
        if page == "examples.md":
            text += _example_scripts()
        files.append(File.generated(config, page, content=text))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Fill the generated sections and point repository-relative links at site pages."""
    markdown = _GENERATED.sub(lambda m: _generate(m.group(1), page.file.src_uri), markdown)
    source = ROOT_PAGES.get(page.file.src_uri, f"docs/{page.file.src_uri}")
    return _outside_code(markdown, lambda text: _rewrite_links(text, source, page.file.src_uri))


# ---------------------------------------------------------------------------------- links
def _outside_code(markdown: str, change: Any) -> str:
    """Apply `change` to the text between fenced code blocks and inline code spans."""
    out, last = [], 0
    for block in [*_FENCE.finditer(markdown), None]:
        end = block.start() if block else len(markdown)
        prose, spans, start = markdown[last:end], [], 0
        for span in _INLINE_CODE.finditer(prose):
            spans += [change(prose[start : span.start()]), span.group(0)]
            start = span.end()
        out += [*spans, change(prose[start:])]
        if block:
            out.append(block.group(0))
            last = block.end()
    return "".join(out)


def _rewrite_links(text: str, source: str, page: str) -> str:
    """Rewrite each relative link of the file `source` to the site page of its target."""

    def rewrite(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):  # a URL, an anchor, an absolute path
            return match.group(0)
        path, hash_, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(source), path)).rstrip("/")
        site_path = LINK_TARGETS.get(repo_path)
        if site_path is None and repo_path.startswith("docs/"):
            site_path = repo_path.removeprefix("docs/")
        if site_path is None:
            return match.group(0)  # not in the site: mkdocs reports it
        relative = posixpath.relpath(site_path, posixpath.dirname(page) or ".")
        return f"{match.group(1)}{relative}{hash_}{anchor}{match.group(3)}"

    return _LINK.sub(rewrite, text)


def _example_scripts() -> str:
    """Every script of examples/ as a section with its source."""
    parts = ["\n## The scripts\n"]
    for script in sorted((_repo / "examples").glob("*.py")):
        code = script.read_text(encoding="utf-8").rstrip()
        parts.append(f"\n### {script.name}\n\n```python\n{code}\n```\n")
    return "".join(parts)


# ------------------------------------------------------------------------ generated pages
def _generate(name: str, page: str) -> str:
    generators = {"unet-config-fields": _config_fields, "presets": _presets}
    if name not in generators:
        log.warning("%s: unknown generated section %r; known: %s", page, name, list(generators))
        return ""
    return f"<!-- generated: {name} -->\n{generators[name]()}\n<!-- /generated -->"


def _config_fields() -> str:
    """Tables of every `UNetConfig` field by group: type, default, choices, meaning."""
    import diffunet.model.config as config_module

    cls = config_module.UNetConfig
    descriptions = yaml.safe_load((_repo / "docs/unet_config_fields.yml").read_text("utf-8"))
    descriptions.update(_attribute_docstrings(cls))
    fields = dataclasses.fields(cls)
    for stale in sorted(set(descriptions) - {f.name for f in fields}):
        log.warning(
            "docs/unet_config_fields.yml describes UNetConfig.%s, which does not exist: "
            "remove or rename the entry",
            stale,
        )
    groups = _field_groups(cls)
    out, current = [], None
    for f in fields:
        group = groups.get(f.name, "other")
        if group != current:
            current = group
            out += [
                f"\n### {group[0].upper()}{group[1:]}\n",
                "| field | type | default | meaning |",
            ]
            out.append("|---|---|---|---|")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        choices = getattr(config_module, f"{f.name.upper()}S", None)
        meaning = " ".join(str(descriptions.get(f.name, "")).split())
        if isinstance(choices, tuple) and choices:
            meaning += " Choices: " + ", ".join(f"`{c!r}`" for c in choices) + "."
        if f.name not in descriptions:
            log.info("UNetConfig.%s has no description in docs/unet_config_fields.yml", f.name)
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", f.type)
        out.append(f"| `{f.name}` | `{annotation}` | `{default!r}` | {meaning.strip()} |")
    return "\n".join(out) + "\n"


def _field_groups(cls: type) -> dict[str, str]:
    """Field → the comment line above its group in the class body (`# widths and depth`)."""
    source = inspect.getsource(cls)
    groups, comment = {}, None
    names = {f.name for f in dataclasses.fields(cls)}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.line.strip() == token.string:
            comment = token.string.lstrip("#").strip()
        elif token.type == tokenize.NAME and token.start[1] == 4 and token.string in names:
            if comment and token.string not in groups:
                groups[token.string] = comment
        elif token.type == tokenize.NAME and token.string == "def":
            break
    return groups


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """Field → the string literal right below it in the class body, where one is written."""
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _presets() -> str:
    """A summary table of every preset, then one section each: source, notes, levels."""
    import torch

    from diffunet.model.introspect import level_summary
    from diffunet.model.presets import list_presets, preset_info
    from diffunet.model.unet import UNet

    summary = ["| preset | dims | parameters | image size | reproduces |", "|---|---|---|---|---|"]
    sections = []
    for name in list_presets():
        info = preset_info(name)
        counts = {}
        for dims in info.dims:
            config = info.config
            if dims != config.dims:
                config = config.replace(dims=dims, resample_axes=None)
            with torch.device("meta"):  # shapes only: no memory, no initialisation cost
                counts[dims] = UNet(config).num_parameters()
        params = ", ".join(
            f"{n:,} ({d}D)" if len(counts) > 1 else f"{n:,}" for d, n in counts.items()
        )
        size = info.config.spatial_size()
        size_text = "×".join(map(str, size)) if size else "any"
        source = " ".join(info.source.split())
        dims_text = ", ".join(f"{d}D" for d in info.dims)
        summary.append(f"| [`{name}`](#{name}) | {dims_text} | {params} | {size_text} | {source} |")
        rows = [
            "| level | resolution | channels | ResBlocks | attention |",
            "|---|---|---|---|---|",
        ]
        for row in level_summary(info.config):
            res = "×".join(map(str, row.resolution)) if row.resolution else "-"
            rows.append(
                f"| {row.level} | {res} | {row.channels} | {row.res_blocks} | {row.attention} |"
            )
        mid_width = info.config.level_channels(info.config.num_levels - 1)
        rows.append(f"| middle | | {mid_width} | 2 | {info.config.resolved_mid_attention_type()} |")
        sections.append(
            f"\n### {name}\n\n**Reproduces** {source}\n\n{' '.join(info.notes.split())}\n\n"
            f"`diffunet.preset({name!r})`, {dims_text}, {params} parameters"
            + (f" at {size_text}" if size else "")
            + ":\n\n"
            + "\n".join(rows)
            + "\n"
        )
    return "\n".join(summary) + "\n" + "".join(sections)
