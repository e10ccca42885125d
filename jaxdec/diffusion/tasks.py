"""ParallelBench-style tasks with exactly known answers: waiting-line edits over lists of names and
4x4 puzzles, a small word-level vocabulary, a seeded generator with a fixed held-out split, graders.

Text format (one token per whitespace-separated word, so prompts can be written by hand)::

    copy : Ada Lovelace , Alan Turing , Grace Hopper =>
    insert Ken Thompson at 1 : Ada Lovelace , Alan Turing , Grace Hopper =>
    insert Ken Thompson anywhere : Ada Lovelace , Alan Turing , Grace Hopper =>
    remove at 0 : Ada Lovelace , Alan Turing , Grace Hopper =>
    remove any : Ada Lovelace , Alan Turing , Grace Hopper =>
    replace at 2 with Ken Thompson : Ada Lovelace , Alan Turing , Grace Hopper =>
    replace any with Ken Thompson : Ada Lovelace , Alan Turing , Grace Hopper =>
    reverse : ... =>        shuffle : ... =>        sort : ... =>   (sort by last name)
    latin : 1 _ 3 4 / _ 4 1 _ / 4 _ _ 1 / 3 1 _ 2 =>
    sudoku : 1 _ 3 4 / 3 4 _ _ / _ 1 4 3 / 4 _ 2 _ =>

A list holds 3-6 people (a first and a last name each, comma separated; first names distinct, last
names distinct); indices are 0-based (``insert at i`` puts the person before the i-th, ``i`` in
``[0, n]``). A grid is 4 rows of 4 cells separated by ``/``; ``_`` is an empty cell. The answer is the
list (``Ada Lovelace , Alan Turing``) or the full grid (``1 2 3 4 / ...``), then ``[EOS]``; a
masked-diffusion model fills the rest of its generation window with ``[EOS]`` (LLaDA's convention).

Graders (`grade`) read only the prompt text and the output text: exact list match; for the
``random`` edits any valid position; for ``shuffle`` any permutation of the list; for puzzles any
valid completion that keeps the clues (rows and columns hold 1-4 once each; sudoku also the 2x2 boxes).

Held-out split: an example is held out iff the first byte of sha256(prompt text) is < 26 (about 10 %),
so no training draw, whatever its seed, can be a held-out prompt (`split_of`). `heldout(task, n)` is the
fixed evaluation set (seed 0 of the held-out stream).
"""
from __future__ import annotations

import dataclasses
import hashlib
import numpy as np

PAD, MASK, EOS, UNK = "[PAD]", "[MASK]", "[EOS]", "[UNK]"
SPECIALS = (PAD, MASK, EOS, UNK)
FIRST = ("Ada", "Alan", "Grace", "Linus", "Edsger", "Barbara", "Donald", "Niklaus", "John", "Frances", "Ken",
         "Dennis", "Tim", "Margaret", "Claude", "Hedy")
LAST = ("Lovelace", "Turing", "Hopper", "Torvalds", "Dijkstra", "Liskov", "Knuth", "Wirth", "Backus", "Allen",
        "Thompson", "Ritchie", "Berners", "Hamilton", "Shannon", "Lamarr")
WORDS = ("copy", "insert", "remove", "replace", "reverse", "shuffle", "sort", "at", "with", "anywhere", "any",
         "latin", "sudoku", ":", ",", "=>", "/", "_")
DIGITS = tuple(str(i) for i in range(7))
VOCAB = SPECIALS + FIRST + LAST + WORDS + DIGITS
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, MASK_ID, EOS_ID, UNK_ID = (TOKEN_ID[s] for s in SPECIALS)
VOCAB_SIZE = len(VOCAB)
# what the answer may hold between items: the delimiters AdaBlock ends a block at
DELIMITER_IDS = (TOKEN_ID[","], TOKEN_ID["/"], EOS_ID)

LIST_TASKS = ("copy", "insert_index", "insert_random", "remove_index", "remove_random", "replace_index",
              "replace_random", "reverse", "shuffle", "sort")
PUZZLE_TASKS = ("latin", "sudoku")
TASKS = LIST_TASKS + PUZZLE_TASKS
MIN_ITEMS, MAX_ITEMS = 3, 6
# longest prompt: "replace at 5 with F L : <6 people> =>" (7 + 17 + 1 tokens); longest answer: 7 people
PROMPT_LEN = 26
GEN_LEN = 24  # answer (<= 20 tokens) + [EOS] fill; divisible by 2, 3, 4, 6, 8, 12


class TaskFormatError(ValueError):
    """A prompt that does not follow the text format (the message says what was expected)."""


# --------------------------------------------------------------------------------------- vocabulary
def encode(text: str) -> list:
    """Token ids of a whitespace-separated text; an unknown word is a ValueError naming it."""
    out = []
    for w in text.split():
        if w not in TOKEN_ID:
            raise ValueError(f"word {w!r} is not in the task vocabulary ({VOCAB_SIZE} words: names, task words, "
                             f"digits 0-6, ':', ',', '=>', '/', '_')")
        out.append(TOKEN_ID[w])
    return out


def decode(ids, stop_at_eos: bool = True) -> str:
    """Text of ids; stops at the first [EOS] (dropped) unless ``stop_at_eos=False``."""
    words = []
    for i in ids:
        i = int(i)
        if stop_at_eos and i == EOS_ID:
            break
        words.append(VOCAB[i] if 0 <= i < VOCAB_SIZE else UNK)
    return " ".join(words)


# --------------------------------------------------------------------------------------- examples
@dataclasses.dataclass(frozen=True)
class Example:
    task: str
    prompt: str  # ends with "=>"
    answer: str  # one correct answer (without [EOS])


def _people_text(people) -> str:
    return " , ".join(f"{f} {l}" for f, l in people)


def _grid_text(grid) -> str:
    return " / ".join(" ".join("_" if v == 0 else str(v) for v in row) for row in grid)


def split_of(prompt: str) -> str:
    """"heldout" for about 10 % of prompts (fixed by the prompt text's sha256), else "train"."""
    return "heldout" if hashlib.sha256(prompt.encode()).digest()[0] < 26 else "train"


def _random_people(rng, n):
    f = rng.choice(len(FIRST), n, replace=False)
    l = rng.choice(len(LAST), n, replace=False)
    return [(FIRST[a], LAST[b]) for a, b in zip(f, l)]


def _fill_grid(rng, boxes: bool):
    """A uniformly drawn valid 4x4 Latin square (with 2x2 boxes: a sudoku) by randomised backtracking."""
    g = np.zeros((4, 4), np.int64)

    def ok(r, c, v):
        if v in g[r] or v in g[:, c]:
            return False
        if boxes:
            br, bc = 2 * (r // 2), 2 * (c // 2)
            if v in g[br:br + 2, bc:bc + 2]:
                return False
        return True

    def rec(k):
        if k == 16:
            return True
        r, c = divmod(k, 4)
        for v in rng.permutation(4) + 1:
            if ok(r, c, v):
                g[r, c] = v
                if rec(k + 1):
                    return True
                g[r, c] = 0
        return False

    rec(0)
    return g


def make_example(task: str, rng) -> Example:
    """One random example of ``task`` (either split)."""
    if task in PUZZLE_TASKS:
        sol = _fill_grid(rng, boxes=task == "sudoku")
        clue = sol.copy()
        blanks = rng.choice(16, int(rng.integers(4, 11)), replace=False)
        clue.flat[blanks] = 0
        return Example(task, f"{task} : {_grid_text(clue)} =>", _grid_text(sol))
    if task not in LIST_TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    n = int(rng.integers(MIN_ITEMS, MAX_ITEMS + 1))
    people = _random_people(rng, n + 1)
    lst, extra = people[:n], people[n]
    body = _people_text(lst)
    x = f"{extra[0]} {extra[1]}"
    if task == "copy":
        return Example(task, f"copy : {body} =>", body)
    if task == "reverse":
        return Example(task, f"reverse : {body} =>", _people_text(lst[::-1]))
    if task == "sort":
        return Example(task, f"sort : {body} =>", _people_text(sorted(lst, key=lambda p: p[1])))
    if task == "shuffle":
        return Example(task, f"shuffle : {body} =>", _people_text([lst[i] for i in rng.permutation(n)]))
    if task.startswith("insert"):
        i = int(rng.integers(0, n + 1))
        ans = _people_text(lst[:i] + [extra] + lst[i:])
        where = f"at {i}" if task == "insert_index" else "anywhere"
        return Example(task, f"insert {x} {where} : {body} =>", ans)
    i = int(rng.integers(0, n))
    if task.startswith("remove"):
        where = f"at {i}" if task == "remove_index" else "any"
        return Example(task, f"remove {where} : {body} =>", _people_text(lst[:i] + lst[i + 1:]))
    where = f"at {i}" if task == "replace_index" else "any"
    return Example(task, f"replace {where} with {x} : {body} =>", _people_text(lst[:i] + [extra] + lst[i + 1:]))


def generate(task: str, n: int, split: str = "train", seed: int = 0, exclude=()) -> list:
    """``n`` distinct examples of ``task`` from ``split`` ("train" or "heldout"), a pure function of
    (task, n, split, seed); prompts in ``exclude`` are skipped."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    rng = np.random.default_rng([seed, TASKS.index(task), 0 if split == "train" else 1])
    seen, out = set(exclude), []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {split} examples of {task!r}")
        ex = make_example(task, rng)
        if ex.prompt in seen or split_of(ex.prompt) != split:
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def heldout(task: str, n: int) -> list:
    """The fixed held-out evaluation set of ``task`` (its first ``n`` examples)."""
    return generate(task, n, "heldout", seed=0)


# --------------------------------------------------------------------------------------- parsing
def _parse_people(words: list, what: str):
    if not words:
        raise TaskFormatError(f"{what}: expected a list 'First Last , First Last ...', got nothing")
    people, cur = [], []
    for w in words + [","]:
        if w == ",":
            if len(cur) != 2 or cur[0] not in FIRST or cur[1] not in LAST:
                raise TaskFormatError(f"{what}: expected 'First Last' between commas, got {' '.join(cur)!r}")
            people.append(tuple(cur))
            cur = []
        else:
            cur.append(w)
    return people


def _parse_grid(words: list, what: str, clues: bool):
    cells = "1234_" if clues else "1234"
    rows, cur = [], []
    for w in words + ["/"]:
        if w == "/":
            if len(cur) != 4:
                raise TaskFormatError(f"{what}: expected 4 cells per row, got {len(cur)}")
            rows.append(cur)
            cur = []
        elif w in cells and len(w) == 1:
            cur.append(0 if w == "_" else int(w))
        else:
            raise TaskFormatError(f"{what}: expected cells among {' '.join(cells)} and '/', got {w!r}")
    if len(rows) != 4:
        raise TaskFormatError(f"{what}: expected 4 rows, got {len(rows)}")
    return np.asarray(rows, np.int64)


def parse_prompt(prompt: str) -> dict:
    """The task and its arguments: {"task", "items" (people or clue grid), "index", "item"}."""
    w = prompt.split()
    if len(w) < 3 or w[-1] != "=>" or ":" not in w:
        raise TaskFormatError(f"a prompt is '<task words> : <list or grid> =>', got {prompt!r}")
    c = w.index(":")
    head, body = w[:c], w[c + 1:-1]
    out = {"index": None, "item": None}
    if head in (["latin"], ["sudoku"]):
        out.update(task=head[0], items=_parse_grid(body, "grid", clues=True))
        return out
    out["items"] = _parse_people(body, "list")
    if len(head) == 1 and head[0] in ("copy", "reverse", "shuffle", "sort"):
        out["task"] = head[0]
    elif len(head) == 5 and head[0] == "insert" and head[3] == "at" and head[4].isdigit():
        out.update(task="insert_index", item=tuple(head[1:3]), index=int(head[4]))
    elif len(head) == 4 and head[0] == "insert" and head[3] == "anywhere":
        out.update(task="insert_random", item=tuple(head[1:3]))
    elif len(head) == 3 and head[:2] == ["remove", "at"] and head[2].isdigit():
        out.update(task="remove_index", index=int(head[2]))
    elif head == ["remove", "any"]:
        out.update(task="remove_random")
    elif len(head) == 6 and head[:2] == ["replace", "at"] and head[2].isdigit() and head[3] == "with":
        out.update(task="replace_index", index=int(head[2]), item=tuple(head[4:6]))
    elif len(head) == 5 and head[:3] == ["replace", "any", "with"]:
        out.update(task="replace_random", item=tuple(head[3:5]))
    else:
        raise TaskFormatError(f"unknown task words {' '.join(head)!r} (see jaxdec.diffusion.tasks)")
    if out["item"] is not None and (out["item"][0] not in FIRST or out["item"][1] not in LAST):
        raise TaskFormatError(f"expected a person 'First Last', got {' '.join(out['item'])!r}")
    return out


# --------------------------------------------------------------------------------------- grading
def _valid_grid(g, boxes: bool) -> bool:
    full = set(range(1, 5))
    lines = [set(g[i]) for i in range(4)] + [set(g[:, j]) for j in range(4)]
    if boxes:
        lines += [set(g[r:r + 2, c:c + 2].ravel()) for r in (0, 2) for c in (0, 2)]
    return all(s == full for s in lines)


def grade(prompt: str, output: str) -> bool:
    """Whether ``output`` (the answer text, no [EOS]) is a correct answer to ``prompt``."""
    p = parse_prompt(prompt)
    words = output.split()
    task = p["task"]
    try:
        if task in PUZZLE_TASKS:
            g = _parse_grid(words, "answer", clues=False)
            clue = p["items"]
            return bool(np.all((clue == 0) | (clue == g)) and _valid_grid(g, boxes=task == "sudoku"))
        got = _parse_people(words, "answer")
    except TaskFormatError:
        return False
    lst, x, i, n = p["items"], p["item"], p["index"], len(p["items"])
    if task == "copy":
        return got == lst
    if task == "reverse":
        return got == lst[::-1]
    if task == "sort":
        return got == sorted(lst, key=lambda q: q[1])
    if task == "shuffle":
        return sorted(got) == sorted(lst)
    if task == "insert_index":
        return got == lst[:i] + [x] + lst[i:]
    if task == "insert_random":
        return any(got == lst[:k] + [x] + lst[k:] for k in range(n + 1))
    if task == "remove_index":
        return got == lst[:i] + lst[i + 1:]
    if task == "remove_random":
        return any(got == lst[:k] + lst[k + 1:] for k in range(n))
    if task == "replace_index":
        return got == lst[:i] + [x] + lst[i + 1:]
    return any(got == lst[:k] + [x] + lst[k + 1:] for k in range(n))  # replace_random


# --------------------------------------------------------------------------------------- arrays
def to_arrays(examples, prompt_len: int = PROMPT_LEN, gen_len: int = GEN_LEN, eos_fill: bool = True) -> dict:
    """Training arrays: ``tokens [N, prompt_len+gen_len]`` (row: prompt, answer, [EOS] fill (only one
    [EOS] when ``eos_fill`` is False, then [PAD]), [PAD] up to the end), ``prompt_len [N]``,
    ``gen_len [N]``, ``answer_len [N]`` (answer tokens, [EOS] excluded)."""
    n = len(examples)
    toks = np.full((n, prompt_len + gen_len), PAD_ID, np.int32)
    plen = np.zeros((n,), np.int32)
    alen = np.zeros((n,), np.int32)
    for r, ex in enumerate(examples):
        p, a = encode(ex.prompt), encode(ex.answer)
        if len(p) > prompt_len or len(a) + 1 > gen_len:
            raise ValueError(f"example {r} needs prompt {len(p)} / answer {len(a) + 1} tokens, more than "
                             f"prompt_len {prompt_len} / gen_len {gen_len}")
        toks[r, :len(p)] = p
        toks[r, len(p):len(p) + len(a)] = a
        if eos_fill:
            toks[r, len(p) + len(a):len(p) + gen_len] = EOS_ID
        else:
            toks[r, len(p) + len(a)] = EOS_ID
        plen[r], alen[r] = len(p), len(a)
    return {"tokens": toks, "prompt_len": plen, "gen_len": np.full((n,), gen_len, np.int32), "answer_len": alen}


def mixture(tasks, per_task: int, split: str = "train", seed: int = 0) -> list:
    """``per_task`` examples of each task, interleaved task by task."""
    per = [generate(t, per_task, split, seed) for t in tasks]
    return [ex for group in zip(*per) for ex in group]

