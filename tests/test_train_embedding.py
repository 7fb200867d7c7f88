"""`stablekit train embedding`: textual inversion learns only its vectors and writes the web UI's file."""

from __future__ import annotations

import pytest
import torch

from stablekit.addons.embeddings import read_embedding
from stablekit.checkpoint import load_model
from stablekit.cli import main
from stablekit.models.tokenizer import CLIPTokenizer
from stablekit.train import embedding as ti

from .test_train_lora import _data

diffusers = pytest.importorskip("diffusers")


def _captioned(folder):
    _data(folder)
    for i in range(3):
        (folder / f"p{i}.txt").write_text(f"a picture of zorp number {i}")
    return folder


def test_only_the_new_vectors_learn_and_the_file_loads_here_and_in_diffusers(tiny_models, tmp_path, monkeypatch):
    tiny = tiny_models["sd1"]
    data = _captioned(tmp_path / "data")
    trained_models = []

    def capture(*args, **kw):
        loaded = load_model(*args, **kw)
        trained_models.append(loaded.model)
        return loaded

    monkeypatch.setattr(ti, "load_model", capture)
    path = ti.train_embedding(tiny.single_file, data, tmp_path / "run", "zorp", steps=20, batch_size=2, lr=5e-2,
                              vectors=2, init_word="picture", size=64, device="cpu")
    assert path.name == "zorp.safetensors"
    (model,) = trained_models
    fresh = load_model(tiny.single_file).model.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())  # nothing but the vectors moved

    emb = read_embedding(path)
    start = ti.initial_vectors(model, CLIPTokenizer(), "picture", 2)
    assert emb.num_vectors == 2 and not torch.equal(emb.vectors, start)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny.diffusers_dir), safety_checker=None)
    pipe.load_textual_inversion(str(path), token="zorp")
    ids = pipe.tokenizer.convert_tokens_to_ids(["zorp", "zorp_1"])
    theirs = pipe.text_encoder.get_input_embeddings().weight.detach()[ids]
    assert (emb.vectors - theirs).abs().max().item() == 0.0


def test_captions_must_name_the_token_and_the_vectors_stand_where_it_is(tiny_models, tmp_path, capsys):
    tok = CLIPTokenizer()
    ids, places = ti.caption_ids(tok, ["a zorp, and Zorp again", "zorp"], "zorp", 3)
    between = tok.encode(", and")
    assert places == [(0, 2), (0, 5 + len(between)), (1, 1)]
    assert ids[0, :2].tolist() == [tok.bos_id, *tok.encode("a")]
    assert ids[0, 5 : 5 + len(between)].tolist() == between
    with pytest.raises(ValueError, match="does not name the token 'zorp'"):
        ti.caption_ids(tok, ["a picture"], "zorp", 1)
    data = _data(tmp_path / "data")  # captions "zorp picture i": fine; then one without the token
    (data / "p1.txt").write_text("a plain picture")
    args = ["train", "embedding", "--model", str(tiny_models["sd1"].single_file), "--data", str(data),
            "--out", str(tmp_path / "o"), "--steps", "1", "--size", "64", "--device", "cpu"]
    assert main(args + ["--token", "zorp"]) == 2 and "does not name the token 'zorp'" in capsys.readouterr().err
    assert main(args + ["--token", "two words"]) == 2
    assert "--token must be one word" in capsys.readouterr().err
