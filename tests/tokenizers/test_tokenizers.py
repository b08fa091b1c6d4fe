"""Tokenizers: World byte-exact with the official TRIE_TOKENIZER, 20B with `tokenizers`."""

import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkvpy import RwkvpyError
from rwkvpy.tokenizers import ByteTokenizer, load_tokenizer, tokenizer_for_model

from conftest import SHARED_DATA as DATA  # noqa: E402
NEOX = DATA / "20B_tokenizer.json"
WORLD_VOCAB = DATA / "rwkv_vocab_v20230424.txt"
if not WORLD_VOCAB.exists():  # the official package ships the same file
    import rwkv.rwkv_tokenizer

    WORLD_VOCAB = Path(rwkv.rwkv_tokenizer.__file__).parent / "rwkv_vocab_v20230424.txt"
needs_data = pytest.mark.skipif(not NEOX.exists() or not (DATA / "tinyshakespeare.txt").exists(),
                                reason="no 20B tokenizer / corpus in ../shared/data or $RWKVPY_SHARED_DATA")

# Arbitrary Unicode (no surrogates), weighted towards the hard parts: emoji, control
# characters, CJK, combining marks, whitespace runs, and long repeats that hit long tokens.
TEXT = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from(list("\x00\x01\t\n\r \u200b\ufeffa€é中文🎉👨‍👩‍👧\u0301\U0010ffff")), max_size=200),
    st.builds(lambda s, n: s * n, st.sampled_from([" ", "-", "\n", "ab", "==", "\t"]), st.integers(1, 200)),
)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def world():
    return load_tokenizer(WORLD_VOCAB)


@pytest.fixture(scope="module")
def official_world():
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(str(WORLD_VOCAB))


@pytest.fixture(scope="module")
def neox():
    return load_tokenizer(NEOX)


@SETTINGS
@given(text=TEXT)
def test_world_equals_official_trie_tokenizer(world, official_world, text):
    ids = world.encode(text)
    assert ids == official_world.encode(text)
    assert world.decode(ids) == text
    assert world.decode_bytes(ids) == text.encode("utf-8")


@needs_data
def test_world_on_a_real_text(world, official_world):
    text = (DATA / "tinyshakespeare.txt").read_text()[:50_000] + " 你好，世界！ Привет 🎉\x00"
    assert world.encode(text) == official_world.encode(text)
    assert world.vocab_size == 65530


def test_world_vocab_with_crlf_line_ends(world, tmp_path):
    crlf = tmp_path / "vocab_crlf.txt"
    crlf.write_bytes(WORLD_VOCAB.read_bytes().replace(b"\n", b"\r\n"))
    other = load_tokenizer(crlf)
    assert other.id_to_bytes == world.id_to_bytes
    text = "line one\r\nline two\n\n  indented 🎉"
    assert other.encode(text) == world.encode(text)


def test_world_vocab_errors_name_the_line(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("1 'a' 1\n2 'bc' 3\n")
    with pytest.raises(RwkvpyError, match="line 2.*3 bytes"):
        load_tokenizer(bad)
    bad.write_text("1 'a' 1\nnonsense\n")
    with pytest.raises(RwkvpyError, match="line 2 is not"):
        load_tokenizer(bad)
    bad.write_text("1 __import__('os') 5\n")
    with pytest.raises(RwkvpyError, match="line 1"):  # never evaluated
        load_tokenizer(bad)


@needs_data
@SETTINGS
@given(text=TEXT)
def test_20b_matches_tokenizers_and_round_trips(neox, text):
    ids = neox.encode(text)
    assert ids == neox._tok.encode(text, add_special_tokens=False).ids
    # The 20B tokenizer normalises to NFC, so NFC text is what round-trips.
    assert neox.decode(ids) == unicodedata.normalize("NFC", text)
    assert neox.decode(ids) == neox._tok.decode(ids, skip_special_tokens=False)


@needs_data
def test_20b_streaming_bytes_concatenate(neox):
    text = "Once upon a time 🎉 naïve café 中文"
    ids = neox.encode(text)
    assert b"".join(neox.decode_bytes([i]) for i in ids) == text.encode()
    assert neox.vocab_size == 50277


@SETTINGS
@given(text=st.text(max_size=200))
def test_bytes_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text), default=0) < 256


@needs_data
def test_tokenizer_choice_follows_model_vocab(tmp_path):
    assert isinstance(tokenizer_for_model(256), ByteTokenizer)
    with pytest.raises(RwkvpyError, match="GPT-NeoX 20B"):
        tokenizer_for_model(50277)
    with pytest.raises(RwkvpyError, match="World"):
        tokenizer_for_model(65536)
    assert tokenizer_for_model(65536, WORLD_VOCAB).name == "world"
    assert tokenizer_for_model(50304, NEOX).vocab_size == 50277  # a padded vocabulary is fine
    with pytest.raises(RwkvpyError, match="does not match the model's 50277"):
        tokenizer_for_model(50277, WORLD_VOCAB)
    with pytest.raises(RwkvpyError, match="does not match the model's 65536"):
        tokenizer_for_model(65536, NEOX)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(NEOX.read_bytes())
    assert tokenizer_for_model(50277, model_path=folder).name == "20B"


def test_unknown_tokenizer_files(tmp_path):
    with pytest.raises(RwkvpyError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(RwkvpyError, match="unknown tokenizer file type"):
        load_tokenizer(tmp_path / "x.bin")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(RwkvpyError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
