"""The text side of previews: CLIP tokenizer, A1111 prompt emphasis, PNG infotext."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from merge_engine.preview.infotext import (
    format_infotext,
    format_parameters,
    parse_infotext,
    read_png_parameters,
    read_png_pixels,
    read_png_text,
    write_png,
)
from merge_engine.preview.prompt import (
    BREAK,
    Chunk,
    apply_emphasis,
    parse_prompt_attention,
    prompt_windows,
    tokenize_weighted,
)
from merge_engine.preview.tokenizer import (
    END_TOKEN,
    PAD_CLIP_L,
    PAD_OPENCLIP,
    START_TOKEN,
    CLIPTokenizer,
    pad_token_for,
    window,
)

torch.set_num_threads(1)

REFERENCE = json.loads((Path(__file__).parent / "data" / "tokenizer-reference.json").read_text())


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.load()


# --- tokenizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda case: case["text"][:40])
def test_tokenizer_matches_the_reference_ids(tokenizer, case):
    assert tokenizer.encode(case["text"]) == case["ids"]


def test_vocabulary_has_clips_size_and_special_tokens(tokenizer):
    assert len(tokenizer.encoder) == 49408
    assert tokenizer.encoder["<|startoftext|>"] == START_TOKEN == 49406
    assert tokenizer.encoder["<|endoftext|>"] == END_TOKEN == 49407
    assert tokenizer.comma_token == 267
    assert CLIPTokenizer.load() is tokenizer


def test_decode_inverts_encode_up_to_cleanup(tokenizer):
    assert tokenizer.decode(tokenizer.encode("Café au lait, 🐱!")) == "café au lait , 🐱!"  # 🐱! is one word: a run of non-letters


def test_windows_use_each_architectures_padding():
    assert pad_token_for("sd1") == pad_token_for("sdxl") == PAD_CLIP_L == END_TOKEN
    assert pad_token_for("sd2") == pad_token_for("sdxl", "text_encoder_2") == PAD_OPENCLIP == 0
    clip_l = window([320, 2368], [1.0, 1.5])
    assert clip_l.tokens == (START_TOKEN, 320, 2368) + (END_TOKEN,) * 74
    assert clip_l.weights == (1.0, 1.0, 1.5) + (1.0,) * 74
    openclip = window([320, 2368], pad_token=pad_token_for("sd2"))
    assert openclip.tokens == (START_TOKEN, 320, 2368, END_TOKEN) + (0,) * 73
    assert len(window([1] * 75).tokens) == 77
    with pytest.raises(ValueError):
        window([1] * 76)
    with pytest.raises(ValueError):
        pad_token_for("sd2", "text_encoder_2")


# --- prompt emphasis ---------------------------------------------------------------------------

PARSE_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(word:0.25)", [("word", 0.25)]),
    ("(word:0)", [("word", 0.0)]),
    ("( word : 1.3 )", [(" word ", 1.3)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("a [b (c", [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.1 / 1.1)]),
    ("closing) only]", [("closing) only]", 1.0)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("\\(a:1.2\\) \\\\ x", [("(a:1.2) \\ x", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("[a:1.2]", [("a:1.2", 1 / 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
    ("fooBREAK break", [("fooBREAK break", 1.0)]),
    ("(a:-1) BREAK (b:-1)", [("a", -1.0), BREAK, ("b", -1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), PARSE_CASES, ids=[c[0] or "empty" for c in PARSE_CASES])
def test_parse_prompt_attention(prompt, expected):
    parsed = parse_prompt_attention(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected])


def test_emphasis_weights_follow_the_tokens(tokenizer):
    [chunk] = tokenize_weighted("a (red:1.5) cat, [dog]", tokenizer)
    assert chunk.tokens == tokenizer.encode("a red cat, dog")
    assert chunk.weights == pytest.approx([1.0, 1.5, 1.0, 1.0, 1 / 1.1])


def test_break_pads_the_chunk_and_starts_another(tokenizer):
    chunks = tokenize_weighted("a cat BREAK a dog", tokenizer)
    assert [c.tokens for c in chunks] == [tokenizer.encode("a cat"), tokenizer.encode("a dog")]
    assert [len(c.tokens) for c in tokenize_weighted("BREAK a dog", tokenizer)] == [0, 2]
    assert [len(c.tokens) for c in tokenize_weighted("a dog BREAK", tokenizer)] == [2]
    assert [len(c.tokens) for c in tokenize_weighted("", tokenizer)] == [0]
    windows = prompt_windows("a cat BREAK a dog", tokenizer, pad_token=0)
    assert [w.tokens[:5] for w in windows] == [(START_TOKEN, 320, 2368, END_TOKEN, 0),
                                               (START_TOKEN, 320, 1929, END_TOKEN, 0)]


def test_long_prompts_are_cut_into_75_token_chunks(tokenizer):
    prompt = " ".join(["cat"] * 160)  # no commas: plain cuts at 75
    chunks = tokenize_weighted(prompt, tokenizer)
    assert [len(c.tokens) for c in chunks] == [75, 75, 10]
    assert sum((c.tokens for c in chunks), []) == tokenizer.encode(prompt)


def test_comma_backtrack_moves_the_last_phrase_to_the_next_chunk(tokenizer):
    # 70 words, a comma at index 70, then 10 more words: the cut moves back after the comma.
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    first, second = tokenize_weighted(prompt, tokenizer)
    assert len(first.tokens) == 71 and first.tokens[-1] == tokenizer.comma_token
    assert second.tokens == tokenizer.encode("dog") * 10
    # A comma further than 20 tokens from the end of the chunk is not a cut point.
    prompt = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 40)
    assert [len(c.tokens) for c in tokenize_weighted(prompt, tokenizer)] == [75, 16]
    # And the backtrack can be switched off, as in the WebUI's settings.
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    assert [len(c.tokens) for c in tokenize_weighted(prompt, tokenizer, comma_backtrack=0)] == [75, 6]


def test_chunk_window_carries_weights():
    built = Chunk([320, 2368], [1.2, 0.5]).window(PAD_OPENCLIP)
    assert built.weights[:4] == (1.0, 1.2, 0.5, 1.0)


def test_apply_emphasis_scales_tokens_and_restores_the_mean():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 8, generator=generator) + 0.5
    weights = torch.ones(2, 77)
    weights[0, 3] = 1.5
    weights[1, 5] = 0.0
    out = apply_emphasis(z, weights)
    assert out.shape == z.shape
    assert out.mean().item() == pytest.approx(z.mean().item(), rel=1e-5)
    scale = z.mean() / (z * weights.unsqueeze(-1)).mean()
    assert torch.allclose(out[0, 3], z[0, 3] * 1.5 * scale)
    assert torch.count_nonzero(out[1, 5]) == 0
    assert torch.allclose(out[0, 0], z[0, 0] * scale)
    assert torch.equal(apply_emphasis(z, torch.ones(2, 77)), z)


# --- infotext and PNG --------------------------------------------------------------------------

def test_infotext_is_in_the_webuis_format():
    text = format_infotext("a cat", "blurry", 4, "Euler", 7.0, 7, 64, 64, "1234567890", "NAME")
    assert text == ("a cat\nNegative prompt: blurry\nSteps: 4, Sampler: Euler, CFG scale: 7, "
                    "Seed: 7, Size: 64x64, Model hash: 1234567890, Model: NAME")
    text = format_infotext("a cat", "", 20, "Euler a", 7.5, 1, 512, 768, "abcdef0123", "mix",
                           clip_skip=2, **{"Schedule type": "Karras"})
    assert text == ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x768, "
                    "Model hash: abcdef0123, Model: mix, Clip skip: 2, Schedule type: Karras")


def test_infotext_round_trips_quoted_values_and_multiline_prompts():
    text = format_infotext("(masterpiece:1.2), a cat\non a mat", "ugly,\nblurry", 4, "DPM++ 2M",
                           7, 42, 64, 64, "1234567890", 'merge "a", b: v2',
                           **{"Recipe": "uniform(a, b)"})
    assert 'Model: "merge \\"a\\", b: v2"' in text
    parsed = parse_infotext(text)
    assert parsed == {
        "Prompt": "(masterpiece:1.2), a cat\non a mat", "Negative prompt": "ugly,\nblurry",
        "Steps": "4", "Sampler": "DPM++ 2M", "CFG scale": "7", "Seed": "42", "Size": "64x64",
        "Model hash": "1234567890", "Model": 'merge "a", b: v2', "Recipe": "uniform(a, b)",
    }
    prompt, negative = parsed.pop("Prompt"), parsed.pop("Negative prompt")
    assert format_parameters(prompt, negative, parsed) == text


def test_a_prompt_without_parameters_is_all_prompt():
    assert parse_infotext("just a prompt, with: a colon") == {
        "Prompt": "just a prompt, with: a colon", "Negative prompt": ""}


def test_png_round_trip_through_a_real_file(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    text = format_infotext("café, 🐱 (cat:1.2)", "bad", 4, "Euler", 7, 7, 48, 64, "1234567890", "NAME")
    path = write_png(tmp_path / "cell.png", pixels, text)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert read_png_parameters(path) == text  # not Latin-1: stored as UTF-8 iTXt
    assert parse_infotext(read_png_parameters(path))["Prompt"] == "café, 🐱 (cat:1.2)"
    assert np.array_equal(read_png_pixels(path), pixels)

    grey = pixels[:, :, 0]
    latin = write_png(tmp_path / "grey.png", grey, "a cat\nSteps: 4, Sampler: Euler, Seed: 1",
                      text={"sdmerge": "{}"})
    assert read_png_text(latin) == {"parameters": "a cat\nSteps: 4, Sampler: Euler, Seed: 1",
                                    "sdmerge": "{}"}
    assert np.array_equal(read_png_pixels(latin)[:, :, 0], grey)
    assert read_png_parameters(write_png(tmp_path / "bare.png", pixels)) is None


def test_png_writer_rejects_what_it_cannot_store(tmp_path):
    with pytest.raises(ValueError):
        write_png(tmp_path / "f.png", np.zeros((4, 4, 3), dtype=np.float32), "x")
    with pytest.raises(ValueError):
        read_png_parameters(Path(__file__))
