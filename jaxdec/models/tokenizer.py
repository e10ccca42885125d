"""Tokenizers for jaxdec: byte-level BPE built from GGUF metadata, or a Hugging Face `tokenizer.json` folder.

The heavy lifting (BPE merges, pre-tokenization, special-token splitting) is done by the `tokenizers`
library; this module only assembles it from a GGUF file's `tokenizer.ggml.*` fields, renders chat templates
with a sandboxed jinja2 environment, and streams detokenized text without ever emitting half a UTF-8
character. It imports nothing from `transformers`.

    tok = Tokenizer.from_gguf(path)
    ids = tok.chat_ids("What is the capital of France?")     # [1, 9690, 198, ...]
    stream = tok.stream()
    for i in new_ids:
        print(stream.push(i), end="")
    print(stream.flush())
"""
from __future__ import annotations

import codecs
import datetime
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

__all__ = ["Tokenizer", "StreamDetokenizer", "byte_level_alphabet"]

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, by `tokenizer.ggml.pre`. GPT-2's pattern is the ByteLevel pre-tokenizer's own.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp splits numerics one by one (its "\p{N}" expression) before the GPT-2 pattern for these, as the
# original tokenizer.json files do; transformers' GGUF conversion does not (see `from_gguf(split_digits=)`).
_GPT2_DIGITS_PRE = frozenset({"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"})
_GPT2_PRE = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2", "stablelm2", "poro-chat"})
_LLAMA3_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"})
_QWEN2_PRE = frozenset({"qwen2"})
SUPPORTED_PRE = tuple(sorted(_GPT2_DIGITS_PRE | _GPT2_PRE | _LLAMA3_PRE | _QWEN2_PRE))


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 bytes are given the
    code points 256, 257, ... in increasing byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    kept = set(keep)
    out = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in kept:
            out[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(out.items()))


_CHAR_TO_BYTE = {c: b for b, c in byte_level_alphabet().items()}


def _token_bytes(token: str) -> bytes:
    """The bytes a ByteLevel decoder produces for one token string (raw UTF-8 if any char is off-alphabet)."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _token_content(tok) -> str | None:
    """`"<s>"`, `{"content": "<s>", ...}` or None, as found in tokenizer_config.json."""
    if tok is None:
        return None
    if isinstance(tok, Mapping):
        return tok.get("content")
    return str(tok)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids, chat template and streaming that decoding needs.

    Build it with `Tokenizer.from_gguf(path_or_reader)`, `Tokenizer.from_folder(path)` or
    `Tokenizer.load(path)` (either). Token ids are plain Python ints.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None = None,
                 eos_ids: Sequence[int] = (), pad_id: int | None = None, chat_template: str | None = None,
                 name: str = "tokenizer"):
        self.backend = backend
        self.name = name
        self._bos_id = None if bos_id is None else int(bos_id)
        self._eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        if pad_id is None:
            pad_id = self._eos_ids[0] if self._eos_ids else None
        self._pad_id = None if pad_id is None else int(pad_id)
        self.chat_template = chat_template
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for what, i in (("bos_id", self._bos_id), ("pad_id", self._pad_id), *(("eos_ids", e) for e in self._eos_ids)):
            if i is not None and not 0 <= i < self._vocab_size:
                raise ValueError(f"{what} {i} is outside the vocabulary [0, {self._vocab_size})")
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._template = None
        self._id_bytes: list[bytes] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """A folder with tokenizer.json, or a GGUF file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            return cls.from_folder(path)
        return cls.from_gguf(path)

    @classmethod
    def from_gguf(cls, path_or_reader, *, split_digits: bool = False) -> "Tokenizer":
        """Byte-level BPE (`tokenizer.ggml.model = gpt2`) from a GGUF file's metadata.

        `split_digits` matters only for the starcoder/smollm family of `tokenizer.ggml.pre`: False (the
        default) reproduces transformers' GGUF conversion, the project's peer (GPT-2 regex only); True also
        isolates every numeric character first, as llama.cpp and the original Hugging Face tokenizer.json
        (`Digits(individual_digits=True)`) do. For SmolLM2 the two differ only on non-ASCII numerals next
        to a space or to each other (e.g. ' ½', '①②', '١٢'): its vocabulary has no multi-digit tokens.
        """
        from jaxdec.models.gguf_loader import field, open_gguf

        if isinstance(path_or_reader, (str, os.PathLike)):
            where = os.fspath(path_or_reader)
            reader = open_gguf(where)
        else:
            reader = path_or_reader
            where = getattr(reader, "path", "<GGUFReader>")
        get = lambda key, default=None: field(reader, key, default)  # noqa: E731

        kind = get("tokenizer.ggml.model")
        if kind is None:
            raise ValueError(f"GGUF file {where!r} has no tokenizer (missing 'tokenizer.ggml.model')")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} in {where!r}: jaxdec builds byte-level "
                             "BPE tokenizers only (tokenizer.ggml.model = 'gpt2', as used by GPT-2, SmolLM, "
                             "Llama-3 and Qwen2 files); SentencePiece ('llama'), WordPiece ('bert'), "
                             "Unigram ('t5') and others are not supported")
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in SUPPORTED_PRE:
            raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) in {where!r}; "
                             f"supported: {', '.join(SUPPORTED_PRE)}")
        tokens = get("tokenizer.ggml.tokens")
        merges = get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise ValueError(f"GGUF file {where!r} lacks 'tokenizer.ggml.tokens' or 'tokenizer.ggml.merges'")
        types = get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"GGUF file {where!r}: {len(types)} token types for {len(tokens)} tokens")

        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # a duplicated string keeps its first id
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise ValueError(f"GGUF file {where!r}: malformed merge {m!r} (expected 'left right')")
            pairs.append((a, b))
        model = models.BPE(vocab, pairs, unk_token=None, fuse_unk=False, byte_fallback=False,
                           ignore_merges=pre in _LLAMA3_PRE)
        tok = tokenizers.Tokenizer(model)
        tok.normalizer = None
        tok.pre_tokenizer = _gguf_pre_tokenizer(pre, split_digits)
        tok.decoder = decoders.ByteLevel()

        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i, ty in enumerate(types) if ty == TOKEN_CONTROL]
        user = [AddedToken(tokens[i], special=False, normalized=False)
                for i, ty in enumerate(types) if ty == TOKEN_USER_DEFINED]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)

        bos = get("tokenizer.ggml.bos_token_id")
        eos = get("tokenizer.ggml.eos_token_id")
        extra_eos = [get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
        eos_ids = [int(e) for e in [eos, *extra_eos] if e is not None]
        pad = get("tokenizer.ggml.padding_token_id")
        add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
        add_eos = bool(get("tokenizer.ggml.add_eos_token", False))
        post = _bos_eos_processor(tok, bos if add_bos else None, eos if add_eos else None)
        if post is not None:
            tok.post_processor = post
        return cls(tok, bos_id=bos, eos_ids=eos_ids, pad_id=pad, chat_template=get("tokenizer.chat_template"),
                   name=str(get("general.name", os.path.basename(str(where)))))

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        """A Hugging Face style folder: tokenizer.json, and if present tokenizer_config.json,
        chat_template.jinja and generation_config.json (extra EOS ids)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder not found: {path!r}")
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"no tokenizer.json in {path!r}")
        tok = tokenizers.Tokenizer.from_file(tj)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()

        def tid(key):
            content = _token_content(config.get(key))
            return None if content is None else tok.token_to_id(content)

        eos_ids = [e for e in [tid("eos_token")] if e is not None]
        gen_eos = _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
        if gen_eos is not None:
            eos_ids += [int(e) for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos])]
        return cls(tok, bos_id=tid("bos_token"), eos_ids=eos_ids, pad_id=tid("pad_token"),
                   chat_template=template, name=os.path.basename(os.path.normpath(path)))

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_ids[0] if self._eos_ids else None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (the GGUF's eos, then eot/eom if the file names them)."""
        return self._eos_ids

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def bos_token(self) -> str | None:
        return None if self._bos_id is None else self.id_to_token(self._bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.id_to_token(self.eos_id)

    def id_to_token(self, token_id: int) -> str | None:
        """The raw vocabulary string of an id (byte-level form, e.g. 'Ġworld'); None if there is none."""
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (e.g. '<|im_start|>') become their ids.
        `add_special_tokens` adds BOS/EOS only where the tokenizer asks for them (SmolLM2: nothing)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        texts = list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode_batch expects strs, got {bad[0]}")
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def _check_ids(self, ids) -> list[int]:
        out = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        for i in out:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self._vocab_size})")
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
        return self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def stream(self, skip_special_tokens: bool = False) -> "StreamDetokenizer":
        return StreamDetokenizer(self, skip_special_tokens=skip_special_tokens)

    @property
    def is_byte_level(self) -> bool:
        """True when decoding is a ByteLevel decoder over per-token bytes (the streaming fast path)."""
        return isinstance(self.backend.decoder, decoders.ByteLevel)

    def id_bytes(self, token_id: int) -> bytes:
        """The bytes a byte-level decoder produces for one id (only for `is_byte_level` tokenizers)."""
        if self._id_bytes is None:
            if not self.is_byte_level:
                raise ValueError("id_bytes needs a byte-level tokenizer")
            table = [b""] * self._vocab_size
            for token, i in self.backend.get_vocab(with_added_tokens=True).items():
                if 0 <= i < self._vocab_size:
                    table[i] = _token_bytes(token)
            self._id_bytes = table
        return self._id_bytes[token_id]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Render the chat template (as Hugging Face does: sandboxed jinja2, trim_blocks, lstrip_blocks)."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.name!r} has no chat template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": "" if self._pad_id is None else self.id_to_token(self._pad_id)}
        variables.update(kwargs)
        return self._template.render(messages=[dict(m) for m in messages],
                                     add_generation_prompt=add_generation_prompt, **variables)

    def chat_ids(self, user_text: str, system: str | None = None, add_generation_prompt: bool = True) -> list[int]:
        """Ids of a one-turn chat prompt (the template already holds its special tokens; none are added)."""
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": user_text})
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))

    def __repr__(self):
        return (f"Tokenizer({self.name!r}, vocab_size={self._vocab_size}, bos_id={self._bos_id}, "
                f"eos_ids={self._eos_ids}, pad_id={self._pad_id})")


class StreamDetokenizer:
    """Incremental detokenization: `push(id)` returns the newly completed text, `flush()` the rest.

    No chunk ends in a partial UTF-8 character: text is held back while the decoded tail could still be
    completed by later tokens. `''.join(pushes) + flush() == tokenizer.decode(all_ids)` exactly.

    Byte-level tokenizers (GGUF BPE) use per-token bytes and an incremental UTF-8 decoder: O(1) per token.
    Other decoders re-decode all ids on each push and hold back trailing U+FFFD characters (O(n) per token;
    exact for decoders whose output for a prefix of the ids extends to the output for all of them).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, byte_level: bool | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.byte_level = tokenizer.is_byte_level if byte_level is None else bool(byte_level)
        if self.byte_level and not tokenizer.is_byte_level:
            raise ValueError("byte_level=True needs a tokenizer with a ByteLevel decoder")
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._flushed = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if self._flushed:
            raise RuntimeError("stream already flushed; call reset() to start a new one")
        (i,) = self.tokenizer._check_ids([token_id])
        self.ids.append(i)
        if self.byte_level:
            if self.skip_special_tokens and i in self.tokenizer.special_ids:
                return ""
            out = self._utf8.decode(self.tokenizer.id_bytes(i), final=False)
        else:
            full = self.tokenizer.decode(self.ids, self.skip_special_tokens)
            stable = full.rstrip("\ufffd")
            if not stable.startswith(self.text):
                return ""  # the decoder rewrote earlier text; wait (flush reconciles what it can)
            out = stable[len(self.text):]
        self.text += out
        return out

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        """Everything still held back (incomplete bytes become U+FFFD, as in `decode`)."""
        if self._flushed:
            return ""
        self._flushed = True
        if self.byte_level:
            out = self._utf8.decode(b"", final=True)
        else:
            full = self.tokenizer.decode(self.ids, self.skip_special_tokens)
            if not full.startswith(self.text):
                raise RuntimeError("the decoder changed already-streamed text; stream and decode() differ")
            out = full[len(self.text):]
        self.text += out
        return out


# ---------------------------------------------------------------------- helpers
def _gguf_pre_tokenizer(pre: str, split_digits: bool):
    if pre in _GPT2_PRE or (pre in _GPT2_DIGITS_PRE and not split_digits):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    pattern = _LLAMA3_PATTERN if pre in _LLAMA3_PRE else _QWEN2_PATTERN
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _bos_eos_processor(tok: tokenizers.Tokenizer, bos: int | None, eos: int | None):
    if bos is None and eos is None:
        return None
    specials, single, pair = [], "$A", "$A $B:1"
    if bos is not None:
        b = tok.id_to_token(int(bos))
        specials.append((b, int(bos)))
        single, pair = f"{b} {single}", f"{b} $A {b}:1 $B:1"
    if eos is not None:
        e = tok.id_to_token(int(eos))
        specials.append((e, int(eos)))
        single, pair = f"{single} {e}", f"{pair} {e}:1"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(specials)))


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _raise_exception(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
