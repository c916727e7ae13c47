"""Text as the chat view shows it: the one place where stored text becomes display markup.

The Chatbot and the answer views render Markdown (code blocks highlighted by Gradio) and pass
the result through Gradio's HTML sanitiser. That alone would still *interpret* HTML a model or a
user wrote: ``<b>`` would turn bold, ``<I am a bot>`` would vanish as an italic tag, ``<img>``
would load. So before rendering:

* a **reply** (:func:`reply_markdown`) keeps its Markdown, with ``&``, ``<`` and ``>`` outside
  code written as character references, so HTML shows as the characters typed and only Markdown
  formats; inside code spans and fenced blocks nothing is changed (Markdown shows code literally
  already, and a reference there would be shown as ``&lt;``);
* a **user message** (:func:`literal_markdown`) is shown exactly as typed: every ASCII
  punctuation character is backslash-escaped (CommonMark § 2.4, "Backslash escapes"), so neither
  Markdown nor HTML in it does anything.

What is stored, trained on, exported and returned to API callers is always the raw text; these
functions only build the view.
"""

from __future__ import annotations

import html
import re

# an opening code fence (CommonMark § 4.5): up to 3 spaces, then 3+ backticks or tildes
_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*$", re.M)
_BACKTICKS = re.compile(r"`+")
_PUNCTUATION = re.compile(r"([!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])")


def _code_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character ranges of ``text`` that Markdown shows as code: fenced blocks
    (an unclosed fence runs to the end, as while a reply is still streaming) and inline code
    spans (a run of n backticks up to the next run of exactly n; an unmatched run is text)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while True:
        m = _FENCE_OPEN.search(text, pos)
        fence_start = m.start() if m else len(text)
        spans += _inline_spans(text, pos, fence_start)
        if m is None:
            return spans
        fence = m.group(1)
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.M).search(text, m.end())
        end = close.end() if close else len(text)
        spans.append((m.start(), end))
        pos = end


def _inline_spans(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans = []
    runs = list(_BACKTICKS.finditer(text, start, end))
    i = 0
    while i < len(runs):
        opening = runs[i]
        closing = next((j for j in range(i + 1, len(runs)) if len(runs[j].group()) == len(opening.group())), None)
        if closing is None:
            i += 1  # no closing run of the same length: these backticks are text
            continue
        spans.append((opening.start(), runs[closing].end()))
        i = closing + 1
    return spans


def reply_markdown(text: str) -> str:
    """``text`` for a Markdown view: Markdown formats, HTML is shown as typed (see the module).

    >>> reply_markdown("2 < 3 && `a<b>`")
    '2 &lt; 3 &amp;&amp; `a<b>`'
    """
    out, pos = [], 0
    for start, end in _code_spans(text):
        out.append(html.escape(text[pos:start], quote=False))
        out.append(text[start:end])
        pos = end
    out.append(html.escape(text[pos:], quote=False))
    return "".join(out)


def literal_markdown(text: str) -> str:
    r"""``text`` for a Markdown view, shown exactly as typed (no Markdown, no HTML).

    >>> literal_markdown("*hi* <b>")
    '\\*hi\\* \\<b\\>'
    """
    escaped = _PUNCTUATION.sub(r"\\\1", text)
    # leading spaces would make an indented code block (where the escapes show): keep them as spaces
    return re.sub(r"^[ \t]+", lambda m: "&nbsp;" * len(m.group().expandtabs(4)), escaped, flags=re.M)
