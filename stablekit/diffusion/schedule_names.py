"""Schedule names as users type them, without torch (the command line's help and checks need no model)."""

from __future__ import annotations

# Canonical name -> the label the web UI shows (A1111 sd_schedulers.py names and labels; "DDIM Uniform"
# is ComfyUI's ddim_uniform, which A1111 labels "DDIM"; here "DDIM" is the DDIM sampler's rule).
SCHEDULE_LABELS = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "normal": "Normal",
    "ddim": "DDIM",
    "ddim_uniform": "DDIM Uniform",
    "beta": "Beta",
    "leading": "Leading",
    "linspace": "Linspace",
    "trailing": "Trailing",
    "lcm": "LCM",
}
SCHEDULE_ALIASES = {"sgmuniform": "sgm_uniform"}  # A1111's alias "SGMUniform", canonicalised


def canonical(name: str) -> str:
    """"DPM++ 2M Karras" -> "dpmpp_2m_karras": the form names and aliases are compared in."""
    return name.strip().lower().replace("+", "p").replace(" ", "_").replace("-", "_")


def resolve_schedule(name: str) -> str:
    """Accept a canonical name, a label or an alias in any case (`sgm_uniform`, `SGM Uniform`, `SGMUniform`).

    Returns the canonical name; unknown names are an error listing the valid ones.
    """
    key = canonical(name)
    known = {**{canonical(label): k for k, label in SCHEDULE_LABELS.items()}, **SCHEDULE_ALIASES}
    if key in SCHEDULE_LABELS or key in known:
        return known.get(key, key)
    choices = ", ".join(f"'{label}' ({k})" for k, label in SCHEDULE_LABELS.items())
    raise ValueError(f"unknown schedule '{name}'; choose from {choices}")
