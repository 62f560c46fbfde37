"""docs/check-your-implementation.md runs as a test: every ``python`` block executes, in order,
each in a fresh namespace; a ``text`` block marked ``<!-- output of the block above -->`` shows
what the block before it prints: its unindented lines (the reports' verdicts) must be printed
as shown, up to the number of examples tried; the indented lines (the smallest input found,
which a future hypothesis may shrink differently) illustrate."""

import contextlib
import io
import pathlib
import re

import pytest

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "check-your-implementation.md"
FENCE = re.compile(r"(<!-- output of the block above -->\n)?```(python|text)\n(.*?)```", re.S)


def blocks():
    """(python source, the output it must print or None) for each python block of the page."""
    found, pairs = FENCE.findall(PAGE.read_text()), []
    for marker, kind, body in found:
        if kind == "python":
            pairs.append([body, None])
        elif marker and pairs:
            pairs[-1][1] = body
    return [tuple(p) for p in pairs]


def test_the_page_has_the_tutorial_blocks():
    sources = [source for source, _ in blocks()]
    assert len(sources) >= 5
    assert any("compare_moco_step" in s for s in sources)
    assert any("optimizer.step()" in s for s in sources)


@pytest.mark.parametrize("source, output", blocks(),
                         ids=lambda v: None if v is None else v.strip().splitlines()[0][:40])
def test_block_runs(source, output, one_torch_thread):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, str(PAGE), "exec"), {"__name__": "tutorial"})
    if output is not None:
        assert verdicts(printed.getvalue()) == verdicts(output)


def verdicts(text):
    return [re.sub(r"\d+ tried", "N tried", line) for line in text.strip().splitlines()
            if not line.startswith(" ")]
