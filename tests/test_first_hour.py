"""The first-hour rough edges (issue: first hour of a new user): the demo model by name, mask sizes
checked before loading, an aligned samplers table, and a command line that answers without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import stablekit
from stablekit.cli import main

from .test_inpaint import make_mask
from .test_img2img import make_picture


def test_the_demo_model_has_a_name_everywhere(capsys):
    engine = stablekit.load("shapes-demo")
    assert engine.loaded.name == "shapes-demo"
    assert main(["info", "shapes-demo"]) == 0
    assert "shapes-demo" in capsys.readouterr().out


def test_a_mask_of_another_size_is_refused_before_loading(tmp_path, capsys):
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    make_picture(96, 64).save(image)
    make_mask().resize((50, 50)).save(mask)
    # A model path that does not exist: the mask check must come first.
    code = main(["inpaint", "--model", str(tmp_path / "nowhere.safetensors"), "--image", str(image),
                 "--mask", str(mask), "--prompt", "p"])
    err = capsys.readouterr().err
    assert code == 2 and "the mask is 50x50 but the picture is 96x64" in err and "--resize-mask" in err


def test_the_samplers_table_stays_aligned(capsys):
    from stablekit.diffusion.samplers import SAMPLERS

    assert main(["samplers"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()[: len(SAMPLERS) + 1]
    for column in ("aliases", "automatic", "options", "schedules"):
        at = header.index(column)
        assert all(row[at - 1] == " " and row[at] != " " for row in rows), column  # every value starts there


# Each command in a fresh interpreter: what it imported is then its own.
NO_TORCH = """
import sys
from stablekit.cli import main
try:
    code = main({argv!r})
except SystemExit as e:
    code = e.code
print("torch imported" if "torch" in sys.modules else "no torch", code)
"""


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["txt2img", "--help"], 0), (["samplers"], 0),
                                        (["txt2img", "--steps", "x"], 2), (["txt2img", "--sampler", "nope"], 2),
                                        (["inpaint", "--prompt", "p"], 2)])
def test_help_samplers_and_argument_errors_do_not_import_torch(argv, code):
    out = subprocess.run([sys.executable, "-c", NO_TORCH.format(argv=argv)], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == f"no torch {code}"


def test_import_stablekit_is_lazy_but_its_names_are_there():
    out = subprocess.run([sys.executable, "-c", "import sys, stablekit; a = 'torch' in sys.modules; "
                          "stablekit.GenerationParams; b = 'torch' in sys.modules; stablekit.load; "
                          "print(a, b, 'torch' in sys.modules)"], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        stablekit.nothing  # noqa: B018 - the access is the test


def test_a_closed_pipe_ends_the_output_quietly():
    """`stablekit samplers | true`: the reader is gone before the table is written (as with `| head` on a
    long output); no error message, no traceback, the shell's 141."""
    proc = subprocess.run(f"{sys.executable} -m stablekit.cli samplers | true; echo ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, check=True)
    assert proc.stderr == "" and proc.stdout.strip() == "141"
