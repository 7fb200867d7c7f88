"""Bad input: every case is a clear error, never a traceback.

Python API: `stablekit.load()` and `GenerationParams.validated()` raise ValueError subclasses
(CheckpointError for files). CLI: a non-zero exit and one line on stderr.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import stablekit
from stablekit.cli import main
from stablekit.detect import CheckpointError

FAST = ["--steps", "1", "--width", "64", "--height", "64", "--device", "cpu", "--sampler", "Euler"]


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must return non-zero with exactly one 'stablekit: error:' line."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    except BaseException as e:  # noqa: BLE001 - an escaping exception is a traceback for the user
        pytest.fail(f"the CLI let {type(e).__name__} escape (the user sees a traceback): {e!r}")
    out, err = capsys.readouterr()
    assert rc not in (0, None), f"exit code {rc}; stdout: {out!r}; stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("stablekit: error: "), lines[0]
    return lines[0]


def txt2img_args(model: Path | str, tmp_path: Path, *extra: str) -> list[str]:
    return ["txt2img", "-m", str(model), "-p", "a cat", *FAST, "--out", str(tmp_path / "out"), *extra]


# --- broken and hostile files --------------------------------------------------------------------------


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def make_truncated_safetensors(tmp: Path, tiny) -> Path:
    data = tiny["sd1"].single_file.read_bytes()
    path = tmp / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return path


def make_truncated_ckpt(tmp: Path, tiny) -> Path:
    full = tmp / "full.ckpt"
    torch.save({"state_dict": load_file(tiny["sd1"].single_file)}, full)
    data = full.read_bytes()
    path = tmp / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    return path


def _write(name: str, content: bytes | str) -> Callable[[Path, dict], Path]:
    def make(tmp: Path, tiny) -> Path:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return make


TEXT = "model:\n  name: my favourite model\n  notes: this is not a checkpoint\n"


def make_unrelated_safetensors(tmp: Path, tiny) -> Path:
    path = tmp / "bert.safetensors"
    save_file({"bert.encoder.layer.0.attention.self.query.weight": torch.zeros(8, 8),
               "bert.pooler.dense.bias": torch.zeros(8)}, str(path))
    return path


def make_empty_dir(tmp: Path, tiny) -> Path:
    path = tmp / "just-a-folder"
    path.mkdir()
    (path / "readme.txt").write_text("hello")
    return path


def make_nonexistent(tmp: Path, tiny) -> Path:
    return tmp / "no-such-model.safetensors"


@dataclass
class Case:
    make: Callable[[Path, dict], Path]
    pattern: str  # regex the message must contain (from `load`, `txt2img` and `info` alike)


FILE_CASES = {
    "truncated-safetensors": Case(make_truncated_safetensors, r"truncated\.safetensors: not a readable safetensors file"),
    "random-safetensors": Case(_write("random.safetensors", _random_bytes(4096)), r"random\.safetensors: not a readable safetensors file"),
    "empty-safetensors": Case(_write("empty.safetensors", b""), r"empty\.safetensors: not a readable safetensors file"),
    "text-safetensors": Case(_write("text.safetensors", TEXT), r"text\.safetensors: not a readable safetensors file"),
    "truncated-ckpt": Case(make_truncated_ckpt, r"truncated\.ckpt: "),
    "random-ckpt": Case(_write("random.ckpt", _random_bytes(4096)), r"random\.ckpt: "),
    "empty-ckpt": Case(_write("empty.ckpt", b""), r"empty\.ckpt: "),
    "text-ckpt": Case(_write("text.ckpt", TEXT), r"text\.ckpt: "),
    # a text starting with "h": the pickle opcode BINGET, which torch's unpickler fails on with a KeyError
    "hello-ckpt": Case(_write("hello.ckpt", "hello world\n"), r"hello\.ckpt: "),
    "text-file": Case(_write("notes.txt", TEXT), r"notes\.txt: unknown checkpoint type; expected one of \.safetensors"),
    "unrelated-safetensors": Case(make_unrelated_safetensors, r"not a Stable Diffusion checkpoint.*bert\."),
    "not-a-diffusers-dir": Case(make_empty_dir, r"just-a-folder: not a diffusers Stable Diffusion folder \(unet/config\.json is missing\)"),
    "nonexistent": Case(make_nonexistent, r"model '.*no-such-model\.safetensors' not found"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_file_python_api(tiny_models, tmp_path, case):
    c = FILE_CASES[case]
    path = c.make(tmp_path, tiny_models)
    with pytest.raises(CheckpointError, match=c.pattern):
        stablekit.load(path, device="cpu")


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_file_cli(tiny_models, tmp_path, capsys, case):
    c = FILE_CASES[case]
    path = c.make(tmp_path, tiny_models)
    line = cli_error(capsys, txt2img_args(path, tmp_path))
    assert re.search(c.pattern, line), line
    assert not (tmp_path / "out").exists()  # nothing was written
    line = cli_error(capsys, ["info", str(path)])  # all of these show before any weight is read
    assert re.search(c.pattern, line), line


@pytest.mark.parametrize("case", ["random-ckpt", "text-ckpt", "hello-ckpt", "empty-ckpt", "truncated-ckpt"])
def test_garbage_ckpt_is_not_called_malicious(tiny_models, tmp_path, case):
    """A damaged or non-PyTorch file is reported as unreadable, not as a pickle that would run code."""
    path = FILE_CASES[case].make(tmp_path, tiny_models)
    with pytest.raises(CheckpointError) as e:
        stablekit.load(path, device="cpu")
    assert str(e.value).startswith(path.name + ": ")
    assert "would run code" not in str(e.value), str(e.value)


def test_missing_relative_path_is_not_found_not_a_hub_download(tmp_path, monkeypatch):
    """A mistyped local path like `models/x.safetensors` should say the file is not there."""
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(CheckpointError) as e:
        stablekit.load("models/missing.safetensors", device="cpu")
    assert "not found" in str(e.value), str(e.value)


def test_hub_failure_without_message_is_still_a_clear_error(tmp_path, monkeypatch):
    """Some network errors carry no text (e.g. TimeoutError()); the message must not crash on that."""
    import huggingface_hub

    def fail(*args, **kwargs):
        raise TimeoutError()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="'someone/some-model' is not a local file, and it cannot be had from the Hugging Face hub"):
        stablekit.load("someone/some-model", device="cpu")


# --- malicious pickles ---------------------------------------------------------------------------------


class OpenFile:
    """Unpickling this creates `marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunShell:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def payload(kind: str, marker: Path) -> OpenFile | RunShell:
    """An object whose unpickling creates `marker` (by opening it, or through a shell)."""
    return RunShell(marker) if kind == "shell" else OpenFile(marker)


def save_pickle(obj: object, path: Path, kind: str) -> Path:
    if kind == "legacy":  # a plain pickle stream, as very old checkpoints are
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:  # the zip format torch.save writes
        torch.save(obj, path)
    return path


def write_payload(kind: str, path: Path, marker: Path) -> Path:
    return save_pickle({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": payload(kind, marker)}},
                       path, kind)


@pytest.mark.parametrize("kind", ["zip", "legacy", "shell"])
def test_payload_really_would_run(tmp_path, kind):
    """The payloads used below do create the marker when unpickled the unsafe way."""
    marker = tmp_path / "ran"
    path = write_payload(kind, tmp_path / "evil.ckpt", marker)
    assert not marker.exists()
    if kind == "legacy":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "shell"])
def test_malicious_pickle_is_refused_without_running(tmp_path, capsys, kind):
    marker = tmp_path / "pwned"
    path = write_payload(kind, tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="nothing in it was executed") as e:
        stablekit.load(path, device="cpu")
    assert "evil.ckpt: refused to load" in str(e.value)
    assert not marker.exists()
    line = cli_error(capsys, txt2img_args(path, tmp_path))
    assert "refused to load" in line and "nothing in it was executed" in line
    line = cli_error(capsys, ["info", str(path)])
    assert "nothing in it was executed" in line
    assert not marker.exists()


def test_refusal_message_is_plain_text(tmp_path):
    """The reason quoted from torch carries no terminal escape codes into logs and UIs."""
    path = write_payload("zip", tmp_path / "evil.ckpt", tmp_path / "pwned")
    with pytest.raises(CheckpointError) as e:
        stablekit.load(path, device="cpu")
    assert "\x1b[" not in str(e.value), repr(str(e.value))


# --- checkpoints with the wrong contents ---------------------------------------------------------------


DROPPED = ["model.diffusion_model.output_blocks.4.0.in_layers.0.weight",
           "model.diffusion_model.middle_block.1.proj_out.weight",
           "model.diffusion_model.time_embed.2.bias"]


@pytest.fixture
def missing_keys_file(tiny_models, tmp_path) -> Path:
    sd = load_file(tiny_models["sd1"].single_file)
    for k in DROPPED:
        del sd[k]
    path = tmp_path / "missing.safetensors"
    save_file(sd, str(path))
    return path


@pytest.fixture
def wrong_shape_file(tiny_models, tmp_path) -> Path:
    sd = load_file(tiny_models["sd1"].single_file)
    key = "model.diffusion_model.out.0.weight"
    sd[key] = torch.ones(sd[key].shape[0] + 1)
    path = tmp_path / "wrong-shape.safetensors"
    save_file(sd, str(path))
    return path


def test_missing_keys_are_named(missing_keys_file, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="missing keys") as e:
        stablekit.load(missing_keys_file, device="cpu")
    for k in DROPPED:
        assert k in str(e.value)
    line = cli_error(capsys, txt2img_args(missing_keys_file, tmp_path))
    assert "missing keys" in line and DROPPED[0] in line


def test_wrongly_shaped_key_is_named(wrong_shape_file, tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"wrongly shaped keys: model\.diffusion_model\.out\.0\.weight: file \(33,\) vs model \(32,\)"):
        stablekit.load(wrong_shape_file, device="cpu")
    line = cli_error(capsys, txt2img_args(wrong_shape_file, tmp_path))
    assert "model.diffusion_model.out.0.weight" in line


def test_text_encoder_width_mismatch(tiny_models, tmp_path, capsys):
    """Shapes that detection itself reads: a text encoder that does not fit the UNet."""
    sd = load_file(tiny_models["sd1"].single_file)
    prefix = "cond_stage_model.transformer.text_model."
    sd[prefix + "embeddings.token_embedding.weight"] = torch.zeros(49408, 64)
    path = tmp_path / "mismatch.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="text encoder width 64 does not match UNet context width 128"):
        stablekit.load(path, device="cpu")
    assert "does not match" in cli_error(capsys, ["info", str(path)])


# --- generation parameters -----------------------------------------------------------------------------


PARAM_CASES = {
    "width-100": (dict(width=100), ["--width", "100"], r"width must be a positive multiple of 8.*got 100"),
    "height-0": (dict(height=0), ["--height", "0"], r"height must be a positive multiple of 8"),
    "steps-0": (dict(steps=0), ["--steps", "0"], r"steps must be between 1 and 1000, got 0"),
    "unknown-sampler": (dict(sampler="Eulr a"), ["--sampler", "Eulr a"], r"unknown sampler 'Eulr a'; choose from .*'Euler a'"),
    "unknown-scheduler": (dict(scheduler="exponentialish"), ["--scheduler", "exponentialish"],
                          r"unknown schedule 'exponentialish'; choose from .*karras"),
    "negative-cfg": (dict(cfg_scale=-1.0), ["--cfg-scale", "-1"], r"cfg scale must be between"),
    "batch-0": (dict(batch_size=0), ["--batch-size", "0"], r"batch size must be between"),
    "eta-on-dpmpp": (dict(sampler="DPM++ 2M", eta=0.5), ["--sampler", "DPM++ 2M", "--eta", "0.5"], r"takes no eta"),
    "seed-too-large": (dict(seed=2**32), ["--seed", str(2**32)], r"seed must be -1"),
}


@pytest.mark.parametrize("case", list(PARAM_CASES))
def test_bad_params_python_api(case):
    fields, _, pattern = PARAM_CASES[case]
    base = dict(prompt="a cat", steps=1, width=64, height=64, sampler="Euler")
    with pytest.raises(ValueError, match=pattern):
        stablekit.GenerationParams(**{**base, **fields}).validated()


@pytest.mark.parametrize("case", list(PARAM_CASES))
def test_bad_params_cli(tiny_models, tmp_path, capsys, case):
    _, args, pattern = PARAM_CASES[case]
    line = cli_error(capsys, txt2img_args(tiny_models["sd1"].single_file, tmp_path, *args))
    assert re.search(pattern, line), line


def test_sampler_error_lists_every_valid_name():
    from stablekit.diffusion.samplers import SAMPLERS

    with pytest.raises(ValueError) as e:
        stablekit.GenerationParams(sampler="nope").validated()
    for spec in SAMPLERS:
        assert f"'{spec.name}'" in str(e.value)


def test_fp16_on_cpu_is_refused(tiny_models, tmp_path, capsys):
    path = tiny_models["sd1"].single_file
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        stablekit.load(path, dtype="fp16", device="cpu")
    line = cli_error(capsys, txt2img_args(path, tmp_path, "--dtype", "fp16"))
    assert "fp16 is not supported on the CPU" in line


def test_unknown_device_and_dtype(tiny_models):
    path = tiny_models["sd1"].single_file
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        stablekit.load(path, device="tpu")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        stablekit.load(path, dtype="fp8", device="cpu")


# --- the real entry point ------------------------------------------------------------------------------


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stablekit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_subprocess_bad_file_and_malicious_pickle(tmp_path):
    bad = _write("random.safetensors", _random_bytes(4096))(tmp_path, {})
    marker = tmp_path / "pwned"
    evil = write_payload("shell", tmp_path / "evil.ckpt", marker)
    for args, expected in ((["info", str(bad)], "random.safetensors: not a readable safetensors file"),
                           (txt2img_args(evil, tmp_path), "nothing in it was executed")):
        proc = _run_cli(*args, cwd=tmp_path)
        assert proc.returncode != 0, proc
        assert "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stablekit: error: "), proc.stderr
        assert expected in lines[0]
    assert not marker.exists()
