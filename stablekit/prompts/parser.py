"""The AUTOMATIC1111 web UI's prompt syntax, pure Python.

Three passes, applied by the web UI in this order: extra-network tags are cut out
(``extract_networks``), each prompt is expanded into one plain text per schedule step
(``prompt_schedules``), and each text is split into (text, weight) runs
(``parse_prompt_attention``) before chunking (see ``chunks.py``).
Behaviour follows the web UI's ``modules/prompt_parser.py`` and ``modules/extra_networks.py``
(v1.6+), hand-written here: no lark grammar, no Earley parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ----------------------------------------------------------------------------- emphasis

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
# The web UI splits plain-text runs on an uppercase, word-bounded BREAK and swallows the
# whitespace around it; the marker entry carries weight -1 (an int, as the web UI emits it).
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_ESCAPABLE = "()[]\\"
_ATTENTION_SPECIAL = "\\()[]:"


def _weight_close(text: str, i: int) -> tuple[int, str] | None:
    """Match ``:<ws>*[+-]?[.digits]+<ws>*)`` at ``text[i] == ':'``; return (end, number text).

    The web UI's pattern has no backtracking choice, so a greedy scan is equivalent;
    ``\\d``/``\\s`` are Unicode there, hence isdecimal()/isspace().
    """
    n, j = len(text), i + 1
    while j < n and text[j].isspace():
        j += 1
    k = j + 1 if j < n and text[j] in "+-" else j
    digits = k
    while k < n and (text[k] == "." or text[k].isdecimal()):
        k += 1
    if k == digits:
        return None
    number = text[j:k]
    while k < n and text[k].isspace():
        k += 1
    return (k + 1, number) if k < n and text[k] == ")" else None


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (text, weight) runs: ``(x)`` x1.1, ``(x:w)`` xw, ``[x]`` /1.1.

    Unclosed brackets weight everything up to the end, stray closers are literal,
    ``\\( \\) \\[ \\] \\\\`` are literal characters (any other backslash is dropped),
    equal-weight neighbours merge, and a word-bounded ``BREAK`` becomes ("BREAK", -1).
    Raises ValueError only where the web UI's float() does: ``(x:1.2.3)``.
    """
    res: list[list] = []  # mutable [text, weight] pairs; weights are multiplied in place
    round_open: list[int] = []  # index into res where each open bracket started
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for entry in res[start:]:
            entry[1] *= factor

    def add_text(run: str) -> None:
        for k, part in enumerate(_BREAK.split(run)):
            if k:
                res.append(["BREAK", -1])
            res.append([part, 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            # Known escapes give their character; a lone backslash gives "" (it is dropped).
            escaped = i + 1 < n and text[i + 1] in _ESCAPABLE
            res.append([text[i + 1] if escaped else "", 1.0])
            i += 2 if escaped else 1
        elif c in "([":
            (round_open if c == "(" else square_open).append(len(res))
            i += 1
        elif c == ":":
            match = _weight_close(text, i)
            if match is not None and round_open:
                try:
                    weight = float(match[1])
                except ValueError:
                    raise ValueError(f"bad emphasis weight {match[1]!r} in prompt {text!r}") from None
                multiply(round_open.pop(), weight)
                i = match[0]
            else:  # a bare ':' (or ':1.2)' with nothing open) is ordinary text
                end = match[0] if match is not None else i + 1
                add_text(text[i:end])
                i = end
        elif c in ")]":
            stack, factor = (round_open, ROUND_MULTIPLIER) if c == ")" else (square_open, SQUARE_MULTIPLIER)
            if stack:
                multiply(stack.pop(), factor)
            else:  # a closer with nothing open is literal
                add_text(c)
            i += 1
        else:
            j = i + 1
            while j < n and text[j] not in _ATTENTION_SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j
    # Unclosed brackets: all round ones (first opened first), then all square ones.
    for start in round_open:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for entry in res[1:]:
        if entry[1] == merged[-1][1]:
            merged[-1][0] += entry[0]
        else:
            merged.append(entry)
    return [(t, w) for t, w in merged]


# ----------------------------------------------------------------------------- schedules


@dataclass
class _Scheduled:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    before: list | None
    after: list
    number: str  # the NUMBER token as written: "." in it means a fraction of the steps
    step: int = 0


@dataclass
class _Alternate:
    """``[a|b|...]``: option (step - 1) % n at each step."""

    options: list


_Parsed = tuple[list, int]  # (nodes, index after them)
_SCHEDULE_SPECIAL = "\\[]():|"


def _plain_end(text: str, i: int) -> int:
    """End of a plain run (any char but ``\\ [ ] ( ) : |``, or ``\\`` + a non-newline char)."""
    n = len(text)
    while i < n:
        if text[i] == "\\":
            if i + 1 >= n or text[i + 1] == "\n":
                return i  # a backslash that escapes nothing: no rule matches it
            i += 2
        elif text[i] in _SCHEDULE_SPECIAL:
            return i
        else:
            i += 1
    return i


# "[WS] NUMBER [WS] ]" after a schedule's last colon. NUMBER is lark's common.SIGNED_NUMBER
# ([+-]? then INT EXP | DECIMAL EXP? | INT, ASCII digits); \s stays Unicode like lark's WHITESPACE.
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*\]")


def _when(text: str, i: int) -> tuple[str, int] | None:
    """The NUMBER text and the index after ']', if ``text[i:]`` closes a schedule."""
    m = _WHEN.match(text, i)
    return (m.group(1), m.end()) if m else None


def _sequence(text: str, i: int) -> _Parsed | None:
    """A bracketed prompt's body: plain text and well-formed groups, up to a delimiter."""
    nodes: list = []
    while True:
        end = _plain_end(text, i)
        if end > i:
            nodes.append(text[i:end])
            i = end
        elif i < len(text) and text[i] in "([":
            group = _group(text, i)
            if group is None:  # inside brackets nothing may stay unmatched
                return None
            nodes += group[0]
            i = group[1]
        else:
            return nodes, i  # the caller checks which delimiter (or end) stopped us


def _group(text: str, i: int) -> _Parsed | None:
    """A well-formed ``(...)``, ``(...:...)``, ``[...]``, ``[...|...]`` or schedule at i, else None."""
    close = ")" if text[i] == "(" else "]"
    first = _sequence(text, i + 1)
    if first is None:
        return None
    body, j = first
    at = text[j] if j < len(text) else ""
    if at == close:  # emphasis keeps its brackets: the attention pass reads them later
        return [text[i], *body, close], j + 1
    if close == ")":
        if at != ":":
            return None
        second = _sequence(text, j + 1)
        if second is None or not text.startswith(")", second[1]):
            return None
        return ["(", *body, ":", *second[0], ")"], second[1] + 1
    if at == "|":
        options = [body]
        while text.startswith("|", j):
            nxt = _sequence(text, j + 1)
            if nxt is None:
                return None
            options.append(nxt[0])
            j = nxt[1]
        return ([_Alternate(options)], j + 1) if text.startswith("]", j) else None
    if at != ":":
        return None
    when = _when(text, j + 1)  # [to:when]
    if when is not None:
        return [_Scheduled(None, body, when[0])], when[1]
    after = _sequence(text, j + 1)  # [from:to:when]
    if after is None or not text.startswith(":", after[1]):
        return None
    when = _when(text, after[1] + 1)
    if when is None:
        return None
    return [_Scheduled(body, after[0], when[0])], when[1]


def _parse_schedule(text: str) -> list | None:
    """Top level: like a body, but unmatched ``[ ] ( ) :`` are kept as text.

    Where a well-formed group starts, it is taken: ``a[b:[c:d:2]:1]e`` is one outer schedule,
    as in the web UI. (When stray brackets sit right next to a group, e.g. ``[a:3]((``, the web
    UI's lark parser picks between the readings by hash order, so it varies per process; we
    always keep the group.) A ``|`` outside an alternation, or a backslash that escapes
    nothing, makes the whole prompt unparsable.
    """
    nodes: list = []
    i = 0
    while i < len(text):
        end = _plain_end(text, i)
        if end > i:
            nodes.append(text[i:end])
            i = end
            continue
        group = _group(text, i) if text[i] in "([" else None
        if group is not None:
            nodes += group[0]
            i = group[1]
        elif text[i] in "[]():":
            nodes.append(text[i])
            i += 1
        else:
            return None
    return nodes


def _walk(nodes: list):
    """Every node, depth first, including those inside branches not taken."""
    for node in nodes:
        yield node
        if isinstance(node, _Scheduled):
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            for option in node.options:
                yield from _walk(option)


def _render(nodes: list, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            out.append(_render(node.before or [], step) if step <= node.step else _render(node.after, step))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def _schedule(prompt: str, base_steps: int, hires_steps: int | None, use_old_scheduling: bool) -> list[tuple[int, str]]:
    # In the hires pass the timeline continues: step numbers count from base_steps, fractions from 1.0.
    hires = hires_steps is not None and not use_old_scheduling
    steps = hires_steps if hires else base_steps
    int_offset, flt_offset = (base_steps, 1.0) if hires else (0, 0.0)
    try:
        nodes = _parse_schedule(prompt)
    except RecursionError:  # absurd nesting: treat like any other unparsable prompt
        nodes = None
    if nodes is None:
        return [(steps, prompt)]
    points = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Alternate):
            points.update(range(1, steps + 1))
        elif isinstance(node, _Scheduled):
            v = float(node.number)
            if use_old_scheduling:
                v = v * steps if v < 1 else v
            elif "." in node.number:  # "0.5" / "1.0" are fractions, "1" / "10" are steps
                v = (v - flt_offset) * steps
            else:
                v = v - int_offset
            if v in (float("inf"), float("-inf")):  # "1e999": the web UI's int() overflows here
                raise ValueError(f"schedule step {node.number!r} in prompt {prompt!r} is out of range")
            node.step = min(steps, int(v))
            if node.step >= 1:
                points.add(node.step)
    return [(t, _render(nodes, t)) for t in sorted(points)]


def prompt_schedules(
    prompts: list[str], steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[list[tuple[int, str]]]:
    """Per prompt, [(last step, text)] as ``get_learned_conditioning_prompt_schedules``.

    ``[from:to:when]``, ``[to:when]``, ``[from::when]`` (when: "." means a fraction of
    ``steps``, else a step number), ``[a|b]`` alternation every step, nesting. A text
    applies up to and including its step. An unparsable prompt is one literal entry.
    """
    return [_schedule(p, steps, hires_steps, use_old_scheduling) for p in prompts]


# ----------------------------------------------------------------------------- extra networks

# The web UI's exact pattern: a word, a colon, then anything up to the first '>'.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class NetworkTag:
    """One ``<kind:field:field...>`` tag; ``items`` are its ':'-separated fields, name first."""

    kind: str
    items: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.items[0]

    @property
    def positional(self) -> tuple[str, ...]:
        """Fields that are not ``key=value``, the name included (the web UI counts it as field 0)."""
        return tuple(item for item in self.items if len(item.split("=", 2)) != 2)

    @property
    def named(self) -> dict[str, str]:
        """``key=value`` fields; "a=b=c" splits in 3 (split('=', 2)) and so stays positional."""
        return dict(item.split("=", 1) for item in self.items if len(item.split("=", 2)) == 2)


def extract_networks(prompt: str) -> tuple[str, list[NetworkTag]]:
    """Remove ``<kind:args>`` tags as ``extra_networks.parse_prompt`` does; tags in order of appearance.

    The tag is replaced by nothing (surrounding spaces and commas stay). For a batch the
    web UI takes the tags of the first prompt only; that choice is the caller's.
    """
    tags: list[NetworkTag] = []

    def cut(match: re.Match) -> str:
        tags.append(NetworkTag(match.group(1), tuple(match.group(2).split(":"))))
        return ""

    return _EXTRA_NETWORK.sub(cut, prompt), tags


def lora_weights(tag: NetworkTag) -> tuple[float, float]:
    """(text-encoder, UNet) multipliers of a ``<lora:name:te:unet>`` tag, by the built-in Lora rules.

    te: 2nd positional field, else 1.0, overridden by ``te=``; unet: 3rd positional field,
    else te, overridden by ``unet=``. ``<lora:x:0.5>`` -> (0.5, 0.5).
    """

    def number(value: str, what: str) -> float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"<{tag.kind}:{':'.join(tag.items)}>: {what} multiplier {value!r} is not a number") from None

    te = number(tag.positional[1], "te") if len(tag.positional) > 1 else 1.0
    te = number(tag.named["te"], "te") if "te" in tag.named else te
    unet = number(tag.positional[2], "unet") if len(tag.positional) > 2 else te
    unet = number(tag.named["unet"], "unet") if "unet" in tag.named else unet
    return te, unet
