"""Long prompts as 77-token CLIP chunks, as the web UI's ``tokenize_line`` builds them.

Each chunk holds 75 prompt tokens, padded, then wrapped as ``[BOS] + 75 + [EOS]``; the
multiplier of every BOS/EOS/padding position is 1.0. A chunk that fills up moves the
tokens after its last comma (if that comma is within ``comma_padding_backtrack`` tokens
of the end) to the next chunk, and ``BREAK`` starts a new chunk.

Textual-inversion embeddings are not handled here; ``find_embedding`` is the hook
through which a caller can splice them in the way the web UI does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>; also SD 1.x's padding
SD2_PAD_ID = 0  # OpenCLIP pads with 0 after the first EOS
COMMA_ID = 267  # ",</w>" in the CLIP vocabulary
CHUNK_LENGTH = 75  # prompt tokens per chunk (77 with BOS and EOS)

Tokenize = Callable[[list[str]], list[list[int]]]
# (token ids of one parsed piece, position) -> (embedding, vectors it fills, ids it consumed) or None
FindEmbedding = Callable[[list[int], int], "tuple[Any, int, int] | None"]


class _Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def bpe_tokenize(tokenizer: _Encoder) -> Tokenize:
    """Adapt an object with ``encode(text) -> ids`` (no BOS/EOS, no padding), e.g.
    ``stablekit.models.tokenizer.CLIPTokenizer``, to the batch ``tokenize`` this module takes."""
    return lambda texts: [tokenizer.encode(t) for t in texts]


@dataclass
class ChunkedPrompt:
    """``chunks``: (tokens, multipliers) pairs, 77 long each; ``token_count``: as the web UI
    counts it (75 per full chunk plus the prompt tokens of the last one);
    ``fixes``: per chunk, (offset without BOS, embedding) for each spliced embedding."""

    chunks: list[tuple[list[int], list[float]]] = field(default_factory=list)
    token_count: int = 0
    fixes: list[list[tuple[int, Any]]] = field(default_factory=list)


def tokenize_line(
    parsed: Sequence[tuple[str, float]],
    tokenize: Tokenize,
    *,
    pad_id: int = EOS_ID,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
    comma_id: int | None = COMMA_ID,
    comma_padding_backtrack: int = 20,
    chunk_length: int = CHUNK_LENGTH,
    find_embedding: FindEmbedding | None = None,
) -> ChunkedPrompt:
    """Chunk ``parse_prompt_attention`` output like ``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line``.

    ``tokenize`` maps each piece's text to BPE ids without BOS/EOS (pieces are tokenized
    separately, as in the web UI). With ``pad_id != eos_id`` (SD 2.x) every position after
    the first EOS of a chunk becomes ``pad_id``, as the web UI does before encoding.
    """
    tokenized = tokenize([text for text, _ in parsed])
    if len(tokenized) != len(parsed):
        raise ValueError(f"tokenize returned {len(tokenized)} id lists for {len(parsed)} texts")

    out = ChunkedPrompt()
    tokens: list[int] = []
    mults: list[float] = []
    fixes: list[tuple[int, Any]] = []
    last_comma = -1  # index in `tokens` of the latest comma, -1 if none in this chunk

    def next_chunk(is_last: bool = False) -> None:
        nonlocal tokens, mults, fixes, last_comma
        out.token_count += len(tokens) if is_last else chunk_length
        short = chunk_length - len(tokens)  # negative only if an embedding overflowed (web UI keeps it)
        row = [bos_id, *tokens, *[eos_id] * max(short, 0), eos_id]
        if pad_id != eos_id:  # SD 2.x: positions after the first EOS are padding
            first = row.index(eos_id)
            row[first + 1 :] = [pad_id] * (len(row) - first - 1)
        out.chunks.append((row, [1.0, *mults, *[1.0] * max(short, 0), 1.0]))
        out.fixes.append(fixes)
        tokens, mults, fixes, last_comma = [], [], [], -1

    for ids, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:  # only the parser's marker: "(BREAK)" stays a word
            next_chunk()
            continue
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma_id:
                last_comma = len(tokens)  # where the comma is about to go
            elif (
                comma_padding_backtrack != 0
                and len(tokens) == chunk_length
                and last_comma != -1
                and len(tokens) - last_comma <= comma_padding_backtrack
            ):
                # Full chunk, a comma nearby: end the chunk after it, carry the rest over.
                carry, carry_mults = tokens[last_comma + 1 :], mults[last_comma + 1 :]
                del tokens[last_comma + 1 :], mults[last_comma + 1 :]
                next_chunk()
                tokens, mults = carry, carry_mults
            if len(tokens) == chunk_length:
                next_chunk()

            found = find_embedding(ids, position) if find_embedding is not None else None
            if found is None:
                tokens.append(token)
                mults.append(weight)
                position += 1
                continue
            embedding, n_vectors, n_ids = found
            if len(tokens) + n_vectors > chunk_length:  # an embedding is never split across chunks
                next_chunk()
            fixes.append((len(tokens), embedding))
            tokens += [0] * n_vectors  # placeholders; the text encoder swaps in the vectors
            mults += [weight] * n_vectors
            position += n_ids

    if tokens or not out.chunks:  # "" still gives one chunk of padding
        next_chunk(is_last=True)
    return out


def chunk_prompt(
    parsed: Sequence[tuple[str, float]],
    tokenize: Tokenize,
    *,
    pad_id: int = EOS_ID,
    comma_padding_backtrack: int = 20,
) -> list[tuple[list[int], list[float]]]:
    """Just the (tokens, multipliers) chunks of ``tokenize_line`` with the CLIP ids."""
    return tokenize_line(parsed, tokenize, pad_id=pad_id, comma_padding_backtrack=comma_padding_backtrack).chunks
