"""stablekit.prompts against the AUTOMATIC1111 web UI's published doctests and stated rules.

Expected values are either copied from the web UI's doctests / source comments
(modules/prompt_parser.py, modules/extra_networks.py) or derived by hand from its rules,
with the derivation in a comment. None are produced by running stablekit.
"""

from __future__ import annotations

import pytest

from stablekit.models.tokenizer import CLIPTokenizer
from stablekit.prompts import (
    BOS_ID, COMMA_ID, EOS_ID, bpe_tokenize, chunk_prompt, extract_networks, lora_weights,
    parse_prompt_attention, prompt_schedules, tokenize_line,
)

# ---------------------------------------------------------------- parse_prompt_attention doctests (vendored data)
ATTENTION_DOCTESTS = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]

# Rule-derived cases: (prompt, expected, why).
ATTENTION_RULES = [
    ("", [("", 1.0)], "nothing parsed -> one empty run"),
    ("[a", [("a", 1 / 1.1)], "unclosed [ weights to the end"),
    ("a)", [("a)", 1.0)], "a closer with nothing open is literal"),
    ("a]b", [("a]b", 1.0)], "same for ]"),
    ("((a)", [("a", 1.1 * 1.1)], "inner ) closes x1.1, the unclosed ( adds x1.1 at the end"),
    ("[(a)]", [("a", 1.1 * (1 / 1.1))], "multipliers apply innermost first"),
    ("(a : 2 )", [("a ", 2.0)], "the weight pattern allows spaces around the number"),
    ("(a:-1)", [("a", -1.0)], "a signed weight"),
    ("a:1.5)", [("a:1.5)", 1.0)], "':1.5)' with no ( open is text"),
    ("a:b", [("a:b", 1.0)], "a bare colon is text"),
    ("\\\\", [("\\", 1.0)], "\\\\ is a literal backslash"),
    ("\\a", [("a", 1.0)], "a backslash before anything else is dropped"),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)], "BREAK swallows the spaces around it"),
    ("a BREAK", [("a", 1.0), ("BREAK", -1), ("", 1.0)], "split leaves an empty run after it"),
    ("aBREAK b_BREAK break", [("aBREAK b_BREAK break", 1.0)], "word-bounded and uppercase only"),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)], "the marker's -1 is multiplied too"),
]


@pytest.mark.parametrize("text, expected", ATTENTION_DOCTESTS)
def test_attention_doctests(text, expected):
    assert parse_prompt_attention(text) == [tuple(e) for e in expected]


@pytest.mark.parametrize("text, expected, why", ATTENTION_RULES)
def test_attention_rules(text, expected, why):
    assert parse_prompt_attention(text) == expected, why


def test_attention_bad_weight_raises_like_the_web_ui():
    # The web UI calls float("1.2.3") here and fails; we fail too, with the prompt named.
    with pytest.raises(ValueError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


# ---------------------------------------------------------------- schedules: doctests (vendored data, steps=10)
SCHEDULE_DOCTESTS = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"],
                     [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]]),
    ("[fe|]male", [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"],
                   [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"],
                     [7, "male"], [8, "male"], [9, "female"], [10, "male"]]),
]
# Doctests with hires_steps=10 (base 10): fractions run 1.0-2.0 over the hires pass.
SCHEDULE_HIRES_DOCTESTS = [
    ("a [b:.5] c", [[10, "a b c"]]),
    ("a [b:1.5] c", [[5, "a  c"], [10, "a b c"]]),
]
# From the comment at the top of prompt_parser.py (steps=100).
FANTASY = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
           "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
FANTASY_SCHEDULE = [
    [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
    [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
    [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
    [75, "fantasy landscape with a lake and an oak in background masterful"],
    [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
]


def _tuples(schedule):
    return [tuple(e) for e in schedule]


@pytest.mark.parametrize("prompt, expected", SCHEDULE_DOCTESTS)
def test_schedule_doctests(prompt, expected):
    assert prompt_schedules([prompt], 10) == [_tuples(expected)]


@pytest.mark.parametrize("prompt, expected", SCHEDULE_HIRES_DOCTESTS)
def test_schedule_hires_doctests(prompt, expected):
    assert prompt_schedules([prompt], 10, hires_steps=10) == [_tuples(expected)]


def test_schedule_source_comment_example():
    assert prompt_schedules([FANTASY], 100) == [_tuples(FANTASY_SCHEDULE)]


def test_stale_doctest_follows_the_grammar():
    # The web UI's doctest says g("a [{b|d{:.5] c") == [[5, 'a  c'], [10, 'a {b|d{ c']], written
    # before '|' joined the excluded characters of `plain`. Under the current grammar '|' may only
    # appear inside [..|..] and this group is not one, so the parse fails and the whole prompt is
    # one literal entry (lark 1.1.2, the web UI's pinned version, gives exactly that).
    assert prompt_schedules(["a [{b|d{:.5] c"], 10) == [[(10, "a [{b|d{:.5] c")]]


SCHEDULE_RULES = [
    ("[a|b|c]", 4, [(1, "a"), (2, "b"), (3, "c"), (4, "a")], "step s uses option (s-1) % 3"),
    ("[a:b:1]", 10, [(1, "a"), (10, "b")], "no '.': step number 1"),
    ("[a:b:1.0]", 10, [(10, "a")], "'.': fraction 1.0 = the last step, so 'b' never shows"),
    ("[a:b:1e1]", 10, [(10, "a")], "1e1 has no '.': absolute step 10"),
    ("[a:b:0]", 10, [(10, "b")], "when=0 is dropped as a point (<1) and every step is past it"),
    ("[a:b:25]", 10, [(10, "a")], "min(steps, 25) = 10"),
    ("[a::3]", 10, [(3, "a"), (10, "")], "[from::when] removes"),
    ("a | b [c:d:5]", 10, [(10, "a | b [c:d:5]")], "'|' outside [..|..] fails the whole parse"),
    ("a \\[b:3\\]", 10, [(10, "a \\[b:3\\]")], "escaped brackets are plain text (kept escaped)"),
    ("a\\", 10, [(10, "a\\")], "a trailing backslash fails the parse -> literal"),
    ("[a:[b:3]:5]", 10, [(3, "a"), (5, "a"), (10, "b")], "points of inner schedules count even when unused"),
    ("[x:[p|q]:2]", 4, [(1, "x"), (2, "x"), (3, "p"), (4, "q")], "alternation adds every step"),
    # Unmatched brackets at top level stay text; the well-formed group next to them is still parsed.
    ("((a [b:c:5]", 10, [(5, "((a b"), (10, "((a c")], "stray ( before"),
    ("a ] [b:c:5]", 10, [(5, "a ] b"), (10, "a ] c")], "stray ] before"),
    ("[b:c:5] ((e", 10, [(5, "b ((e"), (10, "c ((e")], "stray (( after"),
    ("x, (y:1.3, [b:c:0.4]) z)", 10, [(4, "x, (y:1.3, b) z)"), (10, "x, (y:1.3, c) z)")], "0.4*10 -> 4"),
]


@pytest.mark.parametrize("prompt, steps, expected, why", SCHEDULE_RULES)
def test_schedule_rules(prompt, steps, expected, why):
    assert prompt_schedules([prompt], steps) == [expected], why


def test_schedule_old_mode_and_batch():
    # use_old_scheduling: v < 1 is a fraction, anything else a step, so 1.0 means step 1.
    assert prompt_schedules(["[a:b:1.0]", "[a:b:0.5]"], 10, use_old_scheduling=True) == [
        [(1, "a"), (10, "b")], [(5, "a"), (10, "b")]]
    # Hires with a step number: int_offset = base steps, so 15 -> step 5 of the hires pass.
    assert prompt_schedules(["[a:b:15]"], 10, hires_steps=10) == [[(5, "a"), (10, "b")]]
    # One schedule per prompt, in order, duplicates included.
    assert prompt_schedules(["x", "[y:2]", "x"], 4) == [[(4, "x")], [(2, ""), (4, "y")], [(4, "x")]]


def test_schedule_step_out_of_range_raises():
    # float("1e999") is inf and the web UI's int(inf) raises OverflowError; we raise ValueError.
    with pytest.raises(ValueError, match="1e999"):
        prompt_schedules(["[a:b:1e999]"], 10)


# ---------------------------------------------------------------- extra networks
def test_extra_network_docstring_example():
    # extra_networks.ExtraNetwork.activate's docstring: the prompt
    # "1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray>" gives hypernet
    # params [agm, 1.1] and [ray] (and extrasupernet [master, 12, 13, 14]); tags become "".
    text, tags = extract_networks("1girl, <hypernet:agm:1.1> <extrasupernet:master:12:13:14> <hypernet:ray>")
    assert text == "1girl,   "
    assert [(t.kind, t.items) for t in tags] == [
        ("hypernet", ("agm", "1.1")), ("extrasupernet", ("master", "12", "13", "14")), ("hypernet", ("ray",))]
    assert [t.name for t in tags] == ["agm", "master", "ray"]


@pytest.mark.parametrize("prompt, kept, items", [
    ("<lora:>", "<lora:>", None),  # [^>]+ needs one character
    ("<:x>", "<:x>", None),  # \w+ needs one character
    ("<lo ra:x>", "<lo ra:x>", None),  # a space is not \w
    ("<lora:a:b", "<lora:a:b", None),  # never closed
    ("<lora:a<b:1>", "", ("a<b", "1")),  # '<' is allowed inside; the first '>' ends it
    ("<lora:a\n:1>", "", ("a\n", "1")),  # so is a newline
])
def test_extra_network_regex_edges(prompt, kept, items):
    text, tags = extract_networks(prompt)
    assert text == kept
    assert [t.items for t in tags] == ([items] if items else [])


@pytest.mark.parametrize("tag, weights", [
    ("<lora:x>", (1.0, 1.0)),  # default multiplier 1.0 for both
    ("<lora:x:0.8>", (0.8, 0.8)),  # one number sets te, unet defaults to te
    ("<lora:x:0.5:0.2>", (0.5, 0.2)),  # te, unet
    ("<lora:x:te=0.3>", (0.3, 0.3)),  # named te; unet defaults to the (named) te
    ("<lora:x:0.7:unet=0.1>", (0.7, 0.1)),
    ("<lora:x:unet=0.1>", (1.0, 0.1)),
    ("<lora:x:0.5:0.4:te=0.9>", (0.9, 0.4)),  # named te overrides positional; unet stays positional
])
def test_lora_weights(tag, weights):
    assert lora_weights(extract_networks(tag)[1][0]) == weights


def test_lora_weights_quirks():
    # ExtraNetworkParams splits each field with split('=', 2): "a=b=c" has 3 parts, so it counts
    # as positional and becomes te, where the web UI's float() fails; we raise ValueError too.
    tag = extract_networks("<lora:x:a=b=c:0.6>")[1][0]
    assert tag.positional == ("x", "a=b=c", "0.6") and tag.named == {}
    with pytest.raises(ValueError, match="a=b=c"):
        lora_weights(tag)


# ---------------------------------------------------------------- chunking with the project's tokenizer
@pytest.fixture(scope="module")
def tok():
    tokenizer = CLIPTokenizer()
    # The web UI's comma is vocab[',</w>'] = 267; "cat" / "dog" are one BPE id each here,
    # so N words = N tokens and chunk boundaries can be counted by hand.
    assert tokenizer.encode(",") == [COMMA_ID]
    assert len(tokenizer.encode("cat")) == len(tokenizer.encode("dog")) == 1
    return bpe_tokenize(tokenizer)


def _chunks(prompt, tok, **kw):
    return tokenize_line(parse_prompt_attention(prompt), tok, **kw)


def _body(chunk):
    """Prompt tokens of a 77-row: between BOS and the first EOS/padding."""
    tokens = chunk[0]
    assert tokens[0] == BOS_ID and len(tokens) == 77 and len(chunk[1]) == 77
    return tokens[1:tokens.index(EOS_ID)]


def test_empty_prompt_is_one_padding_chunk(tok):
    out = _chunks("", tok)
    assert out.chunks == [([BOS_ID] + [EOS_ID] * 76, [1.0] * 77)] and out.token_count == 0


@pytest.mark.parametrize("n_words, sizes, count", [
    (75, [75], 75),  # exactly one full chunk
    (76, [75, 1], 76),  # the 76th token opens chunk 2; token_count = 75 + 1
    (151, [75, 75, 1], 151),
])
def test_75_token_chunks(tok, n_words, sizes, count):
    cat = tok(["cat"])[0][0]
    out = _chunks(" ".join(["cat"] * n_words), tok)
    assert [len(_body(c)) for c in out.chunks] == sizes and out.token_count == count
    assert all(_body(c) == [cat] * len(_body(c)) for c in out.chunks)
    assert out.chunks[0][0][-1] == EOS_ID  # a full chunk still ends with EOS (77 = 1 + 75 + 1)


@pytest.mark.parametrize("before, after, backtrack, sizes", [
    # comma at index 60: when the 76th token comes, 75 - 60 = 15 <= 20 -> chunk 1 ends after the
    # comma (61 tokens), the 14 words after it move on, then 6 more: chunk 2 = 20.
    (60, 20, 20, [61, 20]),
    (55, 25, 20, [56, 25]),  # 75 - 55 = 20: still within the window (<=); all 25 words move on
    (54, 26, 20, [75, 6]),  # 75 - 54 = 21 > 20: no backtrack, plain 75 split
    (60, 20, 0, [75, 6]),  # comma_padding_backtrack = 0 turns it off
    (60, 20, 15, [61, 20]),  # 15 <= 15
    (60, 20, 14, [75, 6]),  # 15 > 14
    (74, 5, 20, [75, 5]),  # comma is the 75th token: nothing to carry, chunk 2 = 5 words
    (75, 1, 20, [75, 2]),  # comma is the 76th token: it simply opens chunk 2 (",", "cat")
])
def test_comma_backtrack(tok, before, after, backtrack, sizes):
    prompt = " ".join(["cat"] * before) + " , " + " ".join(["dog"] * after)
    out = _chunks(prompt, tok, comma_padding_backtrack=backtrack)
    assert [len(_body(c)) for c in out.chunks] == sizes
    assert out.token_count == 75 * (len(sizes) - 1) + sizes[-1]
    if backtrack and 75 - before <= backtrack and before < 75:
        assert _body(out.chunks[0])[-1] == COMMA_ID  # the comma stays at the end of chunk 1


def test_break(tok):
    cat, dog = tok(["cat"])[0][0], tok(["dog"])[0][0]
    bodies = lambda p: [_body(c) for c in _chunks(p, tok).chunks]  # noqa: E731
    assert bodies("cat BREAK dog") == [[cat], [dog]]
    assert bodies("BREAK cat") == [[], [cat]]  # a leading BREAK emits a padding-only chunk
    assert bodies("cat BREAK") == [[cat]]  # nothing after it: no extra chunk
    assert bodies("cat BREAK BREAK dog") == [[cat], [], [dog]]
    # 75 words then BREAK: the full chunk is emitted once, no empty chunk in between.
    assert [len(b) for b in bodies(" ".join(["cat"] * 75) + " BREAK dog")] == [75, 1]
    # Inside brackets the marker weighs -1.1, not -1: the word "break" is tokenized instead.
    out = _chunks("(cat BREAK dog)", tok)
    assert len(out.chunks) == 1 and _body(out.chunks[0]) == [cat, tok(["break"])[0][0], dog]
    assert out.chunks[0][1][1:4] == [1.1, -1.1, 1.1]


def test_multipliers_follow_the_weights(tok):
    tokens, mults = _chunks("cat (dog:1.5) [cat]", tok).chunks[0]
    assert mults[:5] == [1.0, 1.0, 1.5, 1 / 1.1, 1.0]  # BOS, cat, dog, cat, then EOS/padding at 1.0
    assert mults[4:] == [1.0] * 73


def test_sd2_padding(tok):
    cat = tok(["cat"])[0][0]
    (tokens, _), = chunk_prompt(parse_prompt_attention("cat"), tok, pad_id=0)
    assert tokens == [BOS_ID, cat, EOS_ID] + [0] * 74  # positions after the first EOS become 0
    (tokens, _), = chunk_prompt(parse_prompt_attention(" ".join(["cat"] * 75)), tok, pad_id=0)
    assert tokens == [BOS_ID] + [cat] * 75 + [EOS_ID]  # a full chunk has nothing to pad


def test_embedding_hook(tok):
    # A stand-in lookup: "dog" is an embedding of 3 vectors. The web UI puts emb_len zeros carrying
    # the weight, records (offset without BOS, embedding), and starts a new chunk rather than split.
    dog = tok(["dog"])[0][0]
    find = lambda ids, pos: ("EMB", 3, 1) if ids[pos] == dog else None  # noqa: E731
    out = _chunks("cat (dog)", tok, find_embedding=find)
    assert out.chunks[0][0][:6] == [BOS_ID, tok(["cat"])[0][0], 0, 0, 0, EOS_ID]
    assert out.chunks[0][1][2:5] == [1.1] * 3 and out.fixes == [[(1, "EMB")]]
    out = _chunks(" ".join(["cat"] * 73) + " dog", tok, find_embedding=find)  # 73 + 3 > 75
    assert [len(_body(c)) for c in out.chunks] == [73, 3] and out.fixes == [[], [(0, "EMB")]]
