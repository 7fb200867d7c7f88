"""Reading the web UI's infotext back: the `parameters` PNG chunk -> a dict, as its png-info does."""

from __future__ import annotations

import json
import re

# `Key: value` pairs of the last line; a value is JSON-quoted when it holds , : or a newline.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def parse_infotext(text: str) -> dict[str, str]:
    """`prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: Euler, Size: 512x512, ...` ->
    {"Prompt", "Negative prompt", "Steps", "Sampler", "Size-1", "Size-2", ...} (values as text)."""
    lines = text.strip().split("\n")
    params_line = ""
    if lines and len(_PARAM.findall(lines[-1])) >= 3:
        params_line = lines.pop()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, str] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(params_line):
        value = _unquote(value.strip())
        size = _SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out
