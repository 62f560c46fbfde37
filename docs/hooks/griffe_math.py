"""A Griffe extension: reST math in numpydoc docstrings -> arithmatex delimiters.

refmoco's docstrings follow numpydoc and write math the Sphinx way, inline as
``:math:`x``` and displayed as a ``.. math::`` directive whose body is the rest of the line
plus any more-indented lines that follow. mkdocstrings renders docstrings as Markdown, where
neither form means anything, so before a docstring is parsed this extension rewrites them to
``\\(x\\)`` and ``\\[ ... \\]``, which pymdownx.arithmatex (generic) hands to MathJax.
The docstrings themselves stay valid numpydoc.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_INLINE = re.compile(r":math:`([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def convert(text: str) -> str:
    """Rewrite ``:math:`...``` and ``.. math::`` blocks of one docstring."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith(".. math::"):
            pad = line[: _indent(line)]
            body = [stripped[len(".. math::"):].strip()]
            i += 1
            # The body: the rest of the line and the more-indented lines up to a blank one.
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > len(pad):
                body.append(lines[i].strip())
                i += 1
            if out and out[-1].strip():
                out.append("")
            out += [pad + "\\[", *(pad + b for b in body if b), pad + "\\]"]
            if i < len(lines) and lines[i].strip():
                out.append("")
            continue
        out.append(line)
        i += 1
    # Inline math may run over a line break: join it into one line of TeX.
    return _INLINE.sub(lambda m: "\\(" + " ".join(m.group(1).split()) + "\\)", "\n".join(out))


class ReSTMath(Extension):
    """Convert the math of every docstring before mkdocstrings parses it."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
