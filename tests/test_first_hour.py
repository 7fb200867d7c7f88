"""The first-hour rough edges (issue: first hour of a new user): the demo model by name, mask sizes
checked before loading and an aligned samplers table."""

from __future__ import annotations

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
