"""CLIP byte-level BPE tokenizer, standard library only.

Reproduces the ids of ``transformers.CLIPTokenizer`` (v5, backed by the Rust
``tokenizers`` library) for the OpenAI CLIP vocabulary used by Stable
Diffusion 1.x / 2.x.  Pipeline, mirroring the Rust one:

1. split out literal ``<|startoftext|>`` / ``<|endoftext|>`` (special added tokens);
2. normalize: NFC, then lowercase each character on its own;
3. pre-tokenize with a hand-written scanner equivalent to the CLIP regex;
4. map UTF-8 bytes to printable unicode (GPT-2 ``bytes_to_unicode``);
5. BPE with the end-of-word suffix ``</w>``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import re
import unicodedata

import torch

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_SPECIAL_SPLIT = re.compile("(" + re.escape(_BOS) + "|" + re.escape(_EOS) + ")")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

# The Rust regex engine (Oniguruma) defines `\s` as the Unicode White_Space
# property: Cc 0009-000D and 0085 plus all of Zs/Zl/Zp.  This is NOT Python's
# str.isspace(), which also accepts the separators 001C-001F; those must stay
# ordinary "other" characters here.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r\x85\u2028\u2029"
    " \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u202f\u205f\u3000"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char table (so BPE never sees spaces/controls).

    Insertion order matters: it is the order of the first 256 vocabulary ids
    (printable bytes first, so "!" is id 0, then the shifted unprintable ones).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = (b for b in range(256) if b not in table)
    table.update((b, chr(256 + k)) for k, b in enumerate(shifted))  # moved past 255, in byte order
    return table


_BYTE_CHARS = _bytes_to_unicode()


@functools.lru_cache(maxsize=None)
def _load_vocab() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """Read the merges file once; return (token -> id, merge pair -> rank)."""
    data = importlib.resources.files(__name__.rpartition(".")[0]).joinpath(_VOCAB_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP keeps exactly 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(_BYTE_CHARS.values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [_BOS, _EOS]
    return {t: i for i, t in enumerate(tokens)}, {m: i for i, m in enumerate(merges)}


@functools.lru_cache(maxsize=1 << 16)
def _bpe(word: str) -> tuple[int, ...]:
    """Apply merges to one byte-mapped word; the last symbol carries ``</w>``."""
    vocab, ranks = _load_vocab()
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, 1 << 30))
        if pair not in ranks:
            break
        # Merge every occurrence left to right (non-overlapping).  This gives the
        # same result as the Rust priority-queue order because any merge that
        # consumes a new symbol ranks after the merge that created it.
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return tuple(vocab[p] for p in parts)


def _is_letter(c: str) -> bool:
    return unicodedata.category(c)[0] == "L"


def _is_number(c: str) -> bool:
    return unicodedata.category(c)[0] == "N"


def _pre_tokenize(text: str) -> list[str]:
    """Split like ``<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``.

    Alternatives are tried in order at each position (leftmost-first); whitespace
    matches nothing and is dropped.
    """
    words, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in _WHITESPACE:
            i += 1
            continue
        special = next((s for s in (_BOS, _EOS) if text.startswith(s, i)), None)
        contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
        if special:
            # The ByteLevel pre-tokenizer that follows re-splits with the GPT-2
            # regex, which cuts a (lowercased, hence not "added") special token
            # string into "<|", name, "|>".
            words += ["<|", special[2:-2], "|>"]
            i += len(special)
        elif contraction:
            words.append(contraction)
            i += len(contraction)
        elif _is_letter(c):
            j = i + 1
            while j < n and _is_letter(text[j]):
                j += 1
            words.append(text[i:j])
            i = j
        elif _is_number(c):  # digits are single tokens: "1.25" -> 1 . 2 5
            words.append(c)
            i += 1
        else:
            j = i + 1
            while j < n and not (text[j] in _WHITESPACE or _is_letter(text[j]) or _is_number(text[j])):
                j += 1
            words.append(text[i:j])
            i = j
    return words


class CLIPTokenizer:
    """Byte-level BPE tokenizer of OpenAI CLIP, id-for-id compatible with ``transformers``."""

    bos_id: int = 49406
    eos_id: int = 49407

    def __init__(self, pad_id: int | None = None, max_length: int = 77) -> None:
        """``pad_id=None`` pads with ``eos_id`` (SD 1.x); SD 2.x (OpenCLIP) pads with 0."""
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.max_length = max_length

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``, without bos/eos and without truncation."""
        ids: list[int] = []
        # Literal special tokens in the raw text are matched before normalization
        # (case-sensitively), as transformers does for its added tokens; re.split
        # with a capturing group keeps them at the odd indices.
        for k, segment in enumerate(_SPECIAL_SPLIT.split(text)):
            if k % 2:
                ids.append(self.bos_id if segment == _BOS else self.eos_id)
                continue
            # NFC first, then per-character lowercase: the Rust normalizer maps each
            # char independently, so no final-sigma rule (Python's str.lower() has one).
            # The `\s+` -> " " step is skipped: whitespace is dropped below anyway.
            segment = "".join(c.lower() for c in unicodedata.normalize("NFC", segment))
            for word in _pre_tokenize(segment):
                ids += _bpe("".join(_BYTE_CHARS[b] for b in word.encode("utf-8")))
        return ids

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """LongTensor ``[B, max_length]``: bos + ids[:max_length-2] + eos + padding."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode(text)[: self.max_length - 2], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
