"""jaxdec.models.tokenizer against the peer (transformers' AutoTokenizer on the same GGUF file).

Covers: ids and decoding on every text in jaxdec/data/tokenizer_texts.json, the chat template (single turn,
multi-turn, explicit system message, custom templates), streaming detokenization (texts and hypothesis-drawn
id sequences with multi-byte characters split across tokens), toy GGUF files for each supported
pre-tokenizer family (also checked against the peer), Hugging Face folders, and error messages.
"""
from __future__ import annotations

import json
import os
from importlib import resources

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer import default_gguf_path, peer_tokenizer
from jaxdec.models.tokenizer import StreamDetokenizer, Tokenizer, byte_level_alphabet

FFFD = "\ufffd"
HYP = settings(derandomize=True, deadline=None, max_examples=150,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _texts() -> list[str]:
    with resources.files("jaxdec").joinpath("data/tokenizer_texts.json").open(encoding="utf-8") as f:
        return json.load(f)["texts"]


def _prompts() -> list[str]:
    path = resources.files("jaxdec").joinpath("data/prompts/chat_prompts.jsonl")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


TEXTS = _texts()


@pytest.fixture(scope="module")
def reader():
    from jaxdec.models.gguf_loader import open_gguf
    return open_gguf(default_gguf_path())


@pytest.fixture(scope="module")
def tok(reader):
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def peer():
    return peer_tokenizer()


def peer_ids(peer, text):
    return peer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------- data files
def test_data_files():
    assert len(TEXTS) >= 60 and len(set(TEXTS)) == len(TEXTS) and "" in TEXTS
    prompts = _prompts()
    assert len(prompts) >= 32 and all(isinstance(p, str) and p.strip() for p in prompts)
    assert len(set(prompts)) == len(prompts)


# ---------------------------------------------------------------------------------------------- ids
def test_metadata(tok, peer):
    assert tok.vocab_size == 49152 == len(peer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (1, 2, 2, (2,))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (peer.bos_token_id, peer.eos_token_id, peer.pad_token_id)
    assert tok.id_to_token(0) == "<|endoftext|>" and tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert tok.id_to_token(905) == peer.convert_ids_to_tokens(905) == "Ġworld"
    peer_special = {i for i, t in peer.added_tokens_decoder.items() if t.special}
    assert tok.special_ids == peer_special == set(range(17))
    assert tok.is_byte_level


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_ids_match_peer(tok, peer, i):
    text = TEXTS[i]
    ids = tok.encode(text)
    assert ids == peer_ids(peer, text), repr(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == peer.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == peer.decode(ids, skip_special_tokens=True)


def test_encode_batch_and_special_tokens(tok, peer):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.decode_batch(tok.encode_batch(TEXTS[:5])) == TEXTS[:5]
    # special-token strings map to their ids; SmolLM2's GGUF asks for no BOS, like the peer
    text = "hello <|im_start|> world<|im_end|>x"
    assert tok.encode(text) == [28120, 216, 1, 905, 2, 104]
    assert tok.encode(text, add_special_tokens=True) == peer(text, add_special_tokens=True)["input_ids"]


def test_bytes_without_tokens_are_dropped_like_the_peer(tok, peer):
    # 21 single bytes (e.g. 0x04, 0x13, 0xC0, 0xF1..0xFF) have no token in this vocabulary: both drop them
    for text in ["a\x04b", "\x13\x14", "x\U00040000y"]:
        assert tok.encode(text) == peer_ids(peer, text)
    assert tok.decode(tok.encode("a\x04b")) == "ab"


def test_split_digits_option(reader, tok, peer):
    # llama.cpp / original tokenizer.json behaviour: identical on ASCII digits, differs on ' ½', '①②'
    llama_like = Tokenizer.from_gguf(reader, split_digits=True)
    for text in ["1234567890", "3.14 and 1,000,000", "Call 555-0123 before 23:59"]:
        assert llama_like.encode(text) == tok.encode(text) == peer_ids(peer, text)
    half = " \u00bd"
    assert tok.encode(half) == peer_ids(peer, half) == [3351, 138]  # 'Ġ' merged with the first byte of the '½'
    assert llama_like.encode(half) == [216, tok.token_to_id("\u00c2\u00bd")]  # space isolated, then the '½'
    assert llama_like.decode(llama_like.encode("x \u2460\u2461")) == "x \u2460\u2461"


def test_decode_accepts_arrays_and_rejects_bad_ids(tok):
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array([28120, 905])) == "hello world"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 49152])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(b"bytes")


# ---------------------------------------------------------------------------------------------- chat
CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "multi": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "Tell me a joke about \u732b and \U0001f600."}],
    "system": [{"role": "system", "content": "You are a terse assistant."},
               {"role": "user", "content": "Name a prime.\n\tThanks"}],
    "system_multi": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
                     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "<|im_end|> ok?"}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_peer(tok, peer, name, gen):
    msgs = CONVERSATIONS[name]
    mine = tok.apply_chat_template(msgs, add_generation_prompt=gen)
    assert mine == peer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert tok.encode(mine) == peer_ids(peer, mine)


def test_chat_ids(tok, peer):
    ids = tok.chat_ids("What is the capital of France?")
    assert ids[:3] == [1, 9690, 198] and ids.count(1) == 3  # system, user, assistant turns: no second BOS
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    for prompt in _prompts():
        ref = peer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        assert tok.chat_ids(prompt) == peer_ids(peer, ref), prompt
    sys_ids = tok.chat_ids("Hi", system="Be brief.")
    assert tok.decode(sys_ids) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                                  "<|im_start|>assistant\n"


def test_custom_template_whitespace_control_matches_peer(tok, peer):
    template = ("{{ bos_token }}{% for m in messages %}\n  {% if m['role'] == 'user' %}\n    U: {{ m['content'] }}\n"
                "  {% else %}\n    A: {{ m['content'] | trim }}\n  {% endif %}\n{% endfor %}\n"
                "{% if add_generation_prompt %}A:{% endif %}{{ eos_token }}{{ {'k': 'é'} | tojson }}")
    msgs = CONVERSATIONS["multi"]
    custom = Tokenizer(tok.backend, bos_id=1, eos_ids=(2,), chat_template=template)
    assert custom.apply_chat_template(msgs) == peer.apply_chat_template(msgs, chat_template=template,
                                                                         tokenize=False, add_generation_prompt=True)


def test_template_helpers_and_sandbox(tok):
    from jinja2.exceptions import SecurityError, TemplateError
    bad = Tokenizer(tok.backend, chat_template="{{ raise_exception('only user and assistant roles') }}")
    with pytest.raises(TemplateError, match="only user and assistant roles"):
        bad.apply_chat_template(CONVERSATIONS["single"])
    mutating = Tokenizer(tok.backend, chat_template="{% set _ = messages.append(1) %}x")
    with pytest.raises(SecurityError):
        mutating.apply_chat_template(CONVERSATIONS["single"])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tok.backend).apply_chat_template(CONVERSATIONS["single"])


# ---------------------------------------------------------------------------------------------- streaming
def check_stream(tok, ids, skip=False, byte_level=None):
    """Chunks join to decode(ids); each push emits everything but a trailing run of U+FFFD of the decode
    so far; and no chunk holds U+FFFD where the full decode has a real character."""
    full = tok.decode(ids, skip_special_tokens=skip)
    stream = StreamDetokenizer(tok, skip_special_tokens=skip, byte_level=byte_level)
    chunks = []
    for k, i in enumerate(ids):
        chunks.append(stream.push(i))
        emitted = "".join(chunks)
        now = tok.decode(ids[:k + 1], skip_special_tokens=skip)
        assert now.startswith(emitted), (ids[:k + 1], emitted, now)
        assert set(now[len(emitted):]) <= {FFFD}, (ids[:k + 1], emitted, now)
    chunks.append(stream.flush())
    assert "".join(chunks) == full == stream.text
    pos = 0
    for c in chunks:
        for j, ch in enumerate(c):
            assert ch != FFFD or full[pos + j] == FFFD
        pos += len(c)
    return chunks


@pytest.mark.parametrize("skip", [False, True])
def test_stream_texts(tok, skip):
    held_back = 0
    for text in TEXTS:
        chunks = check_stream(tok, tok.encode(text), skip)
        held_back += sum(c == "" for c in chunks[:-1])
        check_stream(tok, tok.encode(text), skip, byte_level=False)  # generic (re-decoding) path
    assert held_back > 0  # some texts do split characters across tokens


@pytest.fixture(scope="module")
def byte_ids(tok):
    """id of each single-byte token (None for the 21 bytes this vocabulary lacks)."""
    alphabet = byte_level_alphabet()
    return [tok.token_to_id(alphabet[b]) for b in range(256)]


@pytest.fixture(scope="module")
def partial_ids(tok):
    """ids whose bytes are not valid UTF-8 alone: pieces of multi-byte characters."""
    out = []
    for i in range(tok.vocab_size):
        try:
            tok.id_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            out.append(i)
    assert len(out) > 100
    return out


@HYP
@given(data=st.data())
def test_stream_random_ids(tok, peer, partial_ids, data):
    pick = st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(partial_ids), st.integers(0, 16))
    ids = data.draw(st.lists(pick, max_size=24))
    skip = data.draw(st.booleans())
    check_stream(tok, ids, skip)
    assert tok.decode(ids, skip) == peer.decode(ids, skip_special_tokens=skip)


@HYP
@given(data=st.data())
def test_stream_characters_split_across_tokens(tok, byte_ids, data):
    text = data.draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=12))
    raw = text.encode("utf-8")
    drop = data.draw(st.lists(st.booleans(), min_size=len(raw), max_size=len(raw)))
    kept = [b for b, d in zip(raw, drop) if not d or not data.draw(st.booleans())]  # sometimes truncate chars
    ids = [byte_ids[b] for b in kept if byte_ids[b] is not None]
    specials = data.draw(st.lists(st.tuples(st.integers(0, len(ids)), st.sampled_from([0, 1, 2, 5])), max_size=2))
    for pos, sid in sorted(specials, reverse=True):
        ids.insert(pos, sid)  # a special token in the middle of a character's bytes
    check_stream(tok, ids, data.draw(st.booleans()))
    check_stream(tok, ids, byte_level=False)


def test_stream_examples(tok, byte_ids):
    smile = [byte_ids[b] for b in "\U0001f600".encode()]
    s = tok.stream()
    assert [s.push(i) for i in smile] == ["", "", "", "\U0001f600"]
    assert s.flush() == ""
    s = tok.stream()
    assert s.push_many(smile[:2]) == "" and s.flush() == FFFD == tok.decode(smile[:2])
    with pytest.raises(RuntimeError, match="flushed"):
        s.push(5)
    s.reset()
    assert s.push(905) == " world"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.push(10 ** 6)


# ---------------------------------------------------------------------------------------------- toy GGUF files
def write_toy_gguf(path, pre="gpt2", model="gpt2", extra=None, tokenizer=True):
    """A GGUF holding only tokenizer metadata: 2 control tokens, 256 byte tokens, a few merges."""
    import gguf
    alphabet = byte_level_alphabet()
    merges = ["Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "H e", "l l", "He ll", "Hell o", "1 2", "12 3", "Ċ Ċ"]
    tokens = ["<|endoftext|>", "<|bos|>"] + [alphabet[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    if tokenizer:
        w.add_string("tokenizer.ggml.model", model)
        w.add_string("tokenizer.ggml.pre", pre)
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", [3, 3] + [1] * (len(tokens) - 2))
        w.add_array("tokenizer.ggml.merges", merges)
        w.add_uint32("tokenizer.ggml.bos_token_id", 1)
        w.add_uint32("tokenizer.ggml.eos_token_id", 0)
    for k, v in (extra or {}).items():
        (w.add_bool if isinstance(v, bool) else w.add_uint32)(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return str(path)


TOY_TEXT = "Hello world 12345\n\n  x I'M here's 1234567 \u00bd\u00bd \u2460\u2461 \u0661\u0662<|bos|>"


@pytest.mark.parametrize("pre,pieces", [
    ("gpt2", ["Ġ12345", "ĊĊĠ", "'", "M", "Ġ1234567"]),
    ("smollm", ["Ġ12345", "ĊĊĠ"]),
    ("llama-bpe", ["Ġ", "123", "45", "ĊĊ", "'M", "456", "7"]),
    ("qwen2", ["1", "2", "3", "4", "5", "ĊĊ", "'M"]),
])
def test_toy_gguf_pre_tokenizers_match_peer(tmp_path, pre, pieces):
    path = write_toy_gguf(tmp_path / f"toy-{pre}.gguf", pre)
    t = Tokenizer.from_gguf(path)
    split = [p for p, _ in t.backend.pre_tokenizer.pre_tokenize_str(TOY_TEXT)]
    assert all(p in split for p in pieces), split
    ids = t.encode(TOY_TEXT)
    assert ids == peer_ids(peer_tokenizer(path), TOY_TEXT)
    assert t.decode(ids) == TOY_TEXT and ids[-1] == 1


def test_toy_gguf_bos_and_end_tokens(tmp_path):
    path = write_toy_gguf(tmp_path / "toy.gguf", extra={"tokenizer.ggml.add_bos_token": True,
                                                        "tokenizer.ggml.eot_token_id": 1})
    t = Tokenizer.from_gguf(path)
    assert t.encode("Hello", add_special_tokens=True) == [1] + t.encode("Hello")
    assert t.eos_ids == (0, 1) and t.pad_id == 0 and t.chat_template is None


# ---------------------------------------------------------------------------------------------- HF folders
def test_from_folder_matches(tok, peer, tmp_path):
    peer.save_pretrained(tmp_path)
    folder = Tokenizer.from_folder(tmp_path)
    assert (folder.bos_id, folder.eos_ids, folder.pad_id, folder.vocab_size) == (1, (2,), 2, 49152)
    assert folder.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    for msgs in CONVERSATIONS.values():
        assert folder.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
    assert Tokenizer.load(tmp_path).encode("x y") == tok.encode("x y")
    check_stream(folder, tok.encode(TEXTS[-3]))

    # chat template given as a named list in tokenizer_config.json, extra EOS from generation_config.json
    os.remove(tmp_path / "chat_template.jinja")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    folder = Tokenizer.from_folder(tmp_path)
    assert folder.apply_chat_template([]) == "D" and folder.eos_ids == (2, 0)


# ---------------------------------------------------------------------------------------------- errors
def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    text_file = tmp_path / "notes.gguf"
    text_file.write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Tokenizer.from_gguf(text_file)
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'llama'"):
        Tokenizer.from_gguf(write_toy_gguf(tmp_path / "spm.gguf", model="llama"))
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'deepseek-coder'"):
        Tokenizer.from_gguf(write_toy_gguf(tmp_path / "ds.gguf", pre="deepseek-coder"))
    with pytest.raises(ValueError, match="has no tokenizer"):
        Tokenizer.from_gguf(write_toy_gguf(tmp_path / "none.gguf", tokenizer=False))
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        Tokenizer.from_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
