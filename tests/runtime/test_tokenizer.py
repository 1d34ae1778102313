"""PromptTokenizer (the `tokenizers` library on a bundle's tokenizer.json) equals transformers' CLIPTokenizer, the one
diffusers loads from the same folder, called as StableDiffusionPipeline calls it."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy_diff.runtime.bundle import BundleError
from deploy_diff.runtime.tokenizer import PromptTokenizer, check_prompts

EOS = "<|endoftext|>"

# normalisation (NFC, whitespace runs, lower case), byte-level fallback, special tokens in text, truncation
PROMPTS = [
    "",
    " ",
    "a photo of an astronaut riding a horse on the moon",
    "A PHOTO Of An ASTRONAUT",
    "café naïve résumé Ünïcödé ÅÉÎ",
    "e\u0301 combining accent, and \u00e9 precomposed",
    "emoji 🚀🐱‍👤 and flags 🇫🇷",
    "  lots   of \t\n\r whitespace  \u00a0 nbsp \u3000 ideographic space ",
    "日本語のテキスト 中文 한국어 русский ελληνικά العربية",
    "it's you're we've I'LL they'd",
    f"{EOS} a special token in the text <|startoftext|>",
    "numbers 12345, 3.14 and 1e-4!!! ??? ...",
    "ﬁ ligature Ⅻ ½ ² ℃",
    "zero\u200bwidth and soft\u00adhyphen",
    "x" * 400,
    " ".join(["painting"] * 100),
    "portrait of a cat, " * 30,
]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(transformers' CLIPTokenizer on vocab.json + merges.txt, the tokenizer.json transformers converts them to)."""
    from _sd import write_clip_tokenizer_files
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    write_clip_tokenizer_files(folder)
    reference = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    path = folder / "tokenizer.json"
    reference.backend_tokenizer.save(str(path))
    return reference, path


def _reference_ids(reference, prompts, max_length=77):
    """What StableDiffusionPipeline.encode_prompt feeds its text encoder."""
    ids = reference(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return ids.input_ids


def test_equals_transformers_on_many_strings(clip):
    reference, path = clip
    ours = PromptTokenizer(path, 77, EOS, reference.pad_token_id)
    got = ours(PROMPTS)
    assert got.dtype == np.int64 and got.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(got, _reference_ids(reference, PROMPTS))
    for prompt in PROMPTS:  # one str is one row, the same as in a batch
        np.testing.assert_array_equal(ours(prompt), _reference_ids(reference, [prompt]))
    assert got[0, 0] == reference.bos_token_id and got[0, 1] == reference.eos_token_id  # "" -> start, end, pads
    assert (got[:, 0] == reference.bos_token_id).all() and (got[:, -1] != reference.bos_token_id).all()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=120), min_size=1, max_size=3))
def test_equals_transformers_on_random_text(clip, prompts):
    reference, path = clip
    ours = PromptTokenizer(path, 77, EOS)
    np.testing.assert_array_equal(ours(prompts), _reference_ids(reference, prompts))


def test_sd2_pad_token_and_a_short_model_max_length(clip, tmp_path):
    """SD 2.x pads with "!" (id 0), not the end token; a short maximum truncates and keeps the end token."""
    from transformers import CLIPTokenizer

    _, path = clip
    reference = CLIPTokenizer.from_pretrained(path.parent, pad_token="!", model_max_length=12)
    ours = PromptTokenizer(path, 12, "!", 0)
    assert ours.pad_token_id == 0 == reference.pad_token_id
    np.testing.assert_array_equal(ours(PROMPTS), _reference_ids(reference, PROMPTS, max_length=12))
    short = ours("a cat")
    assert short[0, -1] == 0 and reference.eos_token_id in short[0]


def test_truncated_text_is_reported(clip):
    _, path = clip
    ids, dropped = PromptTokenizer(path, 8, EOS).encode(["a cat", "one two three four five six seven eight nine"])
    assert ids.shape == (2, 8) and dropped[0] == ""
    assert dropped[1] == "three four five six seven eight nine"  # the original text, from the first dropped token


@pytest.mark.parametrize(
    "prompt, match",
    [
        (None, "prompt must be a str or a list of str; got NoneType"),
        (3, "got int"),
        ([], "non-empty list"),
        (["a", 2], "the list holds a int"),
        ([["nested"]], "the list holds a list"),
        (b"bytes", "got bytes"),
    ],
)
def test_prompt_types(clip, prompt, match):
    _, path = clip
    with pytest.raises(TypeError, match=match):
        PromptTokenizer(path, 77, EOS)(prompt)
    with pytest.raises(TypeError, match="negative_prompt must be"):
        check_prompts(prompt, "negative_prompt")
    assert check_prompts(("a", "b")) == ["a", "b"] and check_prompts("a") == ["a"]


def test_bad_files_and_settings(clip, tmp_path):
    _, path = clip
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        PromptTokenizer(tmp_path / "missing.json", 77, EOS)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BundleError, match="tokenizers cannot read .*bad.json"):
        PromptTokenizer(tmp_path / "bad.json", 77, EOS)
    with pytest.raises(BundleError, match="no pad token '<pad>'"):
        PromptTokenizer(path, 77, "<pad>")
    with pytest.raises(BundleError, match="gives the pad token .* id \\d+, but the manifest says 5"):
        PromptTokenizer(path, 77, EOS, 5)
    with pytest.raises(ValueError, match="model_max_length must be an int >= 2"):
        PromptTokenizer(path, 1, EOS)


def test_without_tokenizers_the_error_says_what_to_install(clip):
    _, path = clip
    code = (
        "import sys\n"
        "sys.modules['tokenizers'] = None\n"
        "from deploy_diff.runtime.tokenizer import PromptTokenizer\n"
        "from deploy_diff.runtime.backends import BackendUnavailableError\n"
        "try:\n"
        f"    PromptTokenizer({str(path)!r}, 77, '<|endoftext|>')\n"
        "except BackendUnavailableError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'deploy-diff[cpu]'" in out.stdout and "tokenizers" in out.stdout
