"""Long prompts through the CLI, whole process (issue 23): 8 prompts of 999-4087 tokens (a standard-library
module's source followed by a question about it), greedy, 48 new tokens, batch 1, float32 weights,
`jaxdec generate --prompts-file` as a new user runs it, against Hugging Face transformers' greedy
``generate`` (fp32, same GGUF, default threads) on the same prompt token ids in the same run.

Each system runs as one fresh process, timed from its start to its exit (model load, compiles, every
prompt): jaxdec is ``python -m jaxdec.cli generate --prompts-file P --weights f32 --batch-size 1
--max-new-tokens 48 --out O --quiet``; the HF process loads the model and runs ``generate`` on each
prompt's ids (the ids jaxdec's tokenizer gave, read from jaxdec's ``--out`` rows, so both systems see
the same tokens; the HF tokenizer's ids are compared as well). Both stop at EOS (the CLI's default). The
new tokens are compared per prompt; a difference is reported with its first position, not excused.
The two processes run one after the other inside one runner cell, so their load averages are recorded
together (this script's timing is one repetition: a whole-process run costs minutes).

    python experiments/long_prompts_cli.py            # writes results/long_prompts_cli.{json,md}
    python experiments/long_prompts_cli.py --smoke    # two short prompts, 4 new tokens, q weights
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import runner  # noqa: E402

# (module, prompt tokens, question): lengths as in the report (999, 1616, 3538, 4087) and between
PROMPTS = (
    ("shlex", 999, "What does the function split return? Answer in one sentence."),
    ("textwrap", 1616, "What does the function dedent do? Answer in one sentence."),
    ("fractions", 2048, "Which class does this module define? Answer in one sentence."),
    ("json.decoder", 1290, "What does JSONDecoder.raw_decode return? Answer in one sentence."),
    ("argparse", 3538, "What is the purpose of the class ArgumentParser? Answer in one sentence."),
    ("inspect", 4087, "What does the function getsource do? Answer in one sentence."),
    ("typing", 2730, "What is a TypeVar? Answer in one sentence."),
    ("string", 1800, "What does the class Template do? Answer in one sentence."),
)


@dataclasses.dataclass(frozen=True)
class Config:
    new_tokens: int = dataclasses.field(default=48, metadata={"help": "greedy new tokens per prompt"})
    weights: str = dataclasses.field(default="f32", metadata={"choices": ["f32", "q"]})
    n_prompts: int = dataclasses.field(default=8, metadata={"help": "first N of the 8 prompts"})
    scale: float = dataclasses.field(default=1.0, metadata={"help": "prompt lengths times this (smoke: short)"})
    timeout: int = runner.select(3600, "seconds per system process")


SMOKE = Config(new_tokens=4, weights="q", n_prompts=2, scale=0.1)


def build_prompts(cfg: Config) -> list:
    """Texts of ~N tokens: the module's source cut so that source + question encode to about N tokens."""
    import importlib
    import inspect
    from jaxdec.models.gguf_loader import open_gguf
    from jaxdec.models.tokenizer import Tokenizer
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from peer import default_gguf_path
    tok = Tokenizer.from_gguf(open_gguf(default_gguf_path()))
    out = []
    for mod, n, q in PROMPTS[:cfg.n_prompts]:
        n = max(32, int(n * cfg.scale))
        src = inspect.getsource(importlib.import_module(mod))
        head = f"Here is the source code of Python's `{mod}` module:\n\n```python\n"
        tail = f"\n```\n\nQuestion: {q}\nAnswer:"
        room = n - len(tok.encode(head)) - len(tok.encode(tail))
        body = tok.decode(tok.encode(src)[:room])
        out.append(head + body + tail)
    return out


def run_jaxdec(cfg: Config, prompts_file: str, out_file: str) -> dict:
    cmd = [sys.executable, "-m", "jaxdec.cli", "generate", "--prompts-file", prompts_file, "--weights", cfg.weights,
           "--batch-size", "1", "--max-new-tokens", str(cfg.new_tokens), "--out", out_file, "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.timeout, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"jaxdec CLI failed ({p.returncode}): {p.stderr[-2000:]}")
    rows = [json.loads(x) for x in open(out_file)]
    return {"seconds": wall, "command": " ".join(["python"] + cmd[1:]), "rows": rows}


HF_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from peer import peer_model, peer_tokenizer, versions
import torch
spec = json.load(open(sys.argv[2]))
tok, model = peer_tokenizer(), peer_model()
out = []
for ids, text in zip(spec["ids"], spec["texts"]):
    hf_ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), max_new_tokens=spec["new"], do_sample=False)
    out.append({"tokens": g[0, len(ids):].tolist(), "hf_tokenizer_same_ids": hf_ids == ids})
print("HF " + json.dumps({"rows": out, "versions": versions(), "inner_seconds": time.perf_counter() - t0}))
"""


def run_hf(cfg: Config, texts: list, ids: list) -> dict:
    with tempfile.TemporaryDirectory() as d:
        spec = os.path.join(d, "spec.json")
        with open(spec, "w") as f:
            json.dump({"ids": ids, "texts": texts, "new": cfg.new_tokens}, f)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", HF_CODE, os.path.join(ROOT, "tests"), spec], capture_output=True,
                           text=True, timeout=cfg.timeout)
        wall = time.perf_counter() - t0
    line = [x for x in p.stdout.splitlines() if x.startswith("HF ")]
    if p.returncode or not line:
        raise RuntimeError(f"HF process failed ({p.returncode}): {p.stderr[-2000:]}")
    return {"seconds": wall, **json.loads(line[-1][3:])}


def first_difference(a: list, b: list):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def measure(cfg: Config) -> dict:
    texts = build_prompts(cfg)
    with tempfile.TemporaryDirectory() as d:
        pf, of = os.path.join(d, "prompts.jsonl"), os.path.join(d, "out.jsonl")
        with open(pf, "w") as f:
            for t in texts:
                f.write(json.dumps({"prompt": t}) + "\n")
        jx = run_jaxdec(cfg, pf, of)
    ids = [r["prompt_ids"] for r in jx["rows"]]
    hf = run_hf(cfg, texts, ids)
    per = []
    for r, h in zip(jx["rows"], hf["rows"]):
        diff = first_difference(r["tokens"], h["tokens"])
        per.append({"prompt_tokens": len(r["prompt_ids"]), "jaxdec_new": len(r["tokens"]), "hf_new": len(h["tokens"]),
                    "same_tokens": diff is None, "first_difference": diff,
                    "hf_tokenizer_same_ids": h["hf_tokenizer_same_ids"]})
    return {"jaxdec_seconds": jx["seconds"], "hf_seconds": hf["seconds"], "hf_inner_seconds": hf["inner_seconds"],
            "speedup": hf["seconds"] / jx["seconds"], "jaxdec_command": jx["command"], "prompts": per,
            "all_same_tokens": all(p["same_tokens"] for p in per), "versions": hf["versions"]}


def markdown(rec: dict) -> list:
    r = runner.result(rec, "run")
    if r is None:
        return ["(not measured)"]
    c = rec["config"]
    lines = [f"{len(r['prompts'])} prompts (a standard-library module's source + a question), greedy, "
             f"{c['new_tokens']} new tokens (EOS stops a row), batch 1, {c['weights']} weights; whole processes, "
             "one after the other, one repetition.", "",
             f"jaxdec: `{r['jaxdec_command']}`", "",
             "| system | whole process s |", "| --- | ---: |",
             f"| jaxdec CLI ({c['weights']}) | {r['jaxdec_seconds']:.1f} |",
             f"| HF transformers fp32 generate | {r['hf_seconds']:.1f} |", "",
             f"HF seconds / jaxdec seconds: **{r['speedup']:.2f}x** (goal: >= 2x); same tokens on every prompt: "
             f"**{r['all_same_tokens']}**.", "",
             "| prompt tokens | jaxdec new | HF new | same tokens | first difference | HF tokenizer same ids |",
             "| ---: | ---: | ---: | --- | ---: | --- |"]
    for p in r["prompts"]:
        diff = "" if p["first_difference"] is None else p["first_difference"]
        lines.append(f"| {p['prompt_tokens']} | {p['jaxdec_new']} | {p['hf_new']} | {p['same_tokens']} | {diff} | "
                     f"{p['hf_tokenizer_same_ids']} |")
    return lines


def main(argv=None):
    cfg, opts = runner.parse_args(Config, argv, description=__doc__, smoke=SMOKE)
    runner.run_experiment("long_prompts_cli", cfg, ["run"], lambda cell: measure(cfg), opts=opts,
                          title="Long prompts through the CLI, whole process, vs HF transformers", markdown=markdown)


if __name__ == "__main__":
    main()
