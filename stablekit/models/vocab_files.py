"""CLIP's vocab.json and merges.txt (as the hub's CLIP repos ship them), derived from the packaged BPE file.

Used to build a transformers `CLIPTokenizer` for the reference pipelines in tests and the benchmark;
the engine's own tokenizer reads the BPE file directly and never needs these.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

VOCAB_GZ = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"


def vocab_files(folder: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    # CLIP uses the first 49152 - 256 - 2 merges of the file (line 0 is a version header).
    merges = gzip.open(VOCAB_GZ, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = _bytes_to_unicode()
    vocab = list(byte_chars) + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]  # in CLIP's vocabulary order: printable bytes first
