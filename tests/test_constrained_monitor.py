"""Monitors (issue #18): the `Monitor` hooks as a host logits processor, and `JediMonitor` (identifiers after
``obj.`` restricted to what jedi completes over the code context).

No model: the hooks on a hand-made vocabulary (spelling an attribute over several tokens, the token that
ends it, speculative block nodes replayed along their paths, a new run starting over). Real default model:
on a small class the model alone writes an attribute the class does not have (negative control); with the
monitor it writes one jedi completes; the monitor's host time per step is reported.
"""
from __future__ import annotations

import os
import re
import sys
import types

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from test_constrained import lm, tokenizer  # noqa: E402,F401

import jaxdec  # noqa: E402
from jaxdec.constrained import JediMonitor, MonitorProcessor  # noqa: E402

jedi = pytest.importorskip("jedi")

CODE = '''class Account:
    def __init__(self, owner):
        self.owner_name = owner
        self.balance_cents = 0

    def deposit_cents(self, amount):
        self.balance_cents += amount


acct = Account("ann")
acct.deposit_cents(500)
print("balance:", acct.'''


class ToyTokenizer:
    """Token texts by id; id 0 is a special (EOS-like) token."""

    def __init__(self, vocab):
        self.vocab, self.vocab_size, self.special_ids = vocab, len(vocab), (0,)

    def id_bytes(self, i):
        return self.vocab[i].encode()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.vocab[i] for i in ids if i != 0)


TOY = ["<eos>", "bal", "ance", "_cents", "balance", "(", ")", "dep", "osit", "_cents)", "x", ".bal", ".", "\n",
       " ", "ance_c", "ents", "owner", "_name", "acct"]


def allowed(x, row, pos=0):
    return sorted(TOY[i] for i in np.nonzero(np.isfinite(x[row, pos]))[0])


def ctx(tokens, num_new, block=None, parents=None):
    tokens = np.asarray([tokens + [0] * (8 - len(tokens))], np.int32)
    block = np.asarray([block or [0]], np.int32)
    parents = np.asarray([parents or [-1]], np.int32)
    return types.SimpleNamespace(tokens=tokens, num_new=np.asarray([num_new]), done=np.asarray([False]),
                                 block=block, parents=parents)


def test_jedi_monitor_hooks_on_a_toy_vocabulary():
    code = CODE.replace('print("balance:", acct.', "acct.")
    mon = MonitorProcessor(JediMonitor(code, ToyTokenizer(TOY)))
    t = {s: i for i, s in enumerate(TOY)}
    zeros = np.zeros((1, 1, len(TOY)), np.float32)
    # the code ends with "acct.": names are balance_cents, deposit_cents, owner_name (no dunders)
    assert allowed(mon(zeros, ctx([], 0)), 0) == ["bal", "balance", "dep", "owner"]
    # "bal" + "ance" committed: only what continues "balance" to "balance_cents" (or ends it there)
    assert allowed(mon(zeros, ctx([t["bal"], t["ance"]], 2)), 0) == ["_cents", "_cents)"]
    # "balance_cents" complete: every token that is not an identifier piece (incl. EOS) may end it
    done = allowed(mon(zeros, ctx([t["balance"], t["_cents"]], 2)), 0)
    assert "(" in done and "<eos>" in done and "bal" not in done and "_cents" not in done
    # after ")" the monitor is dormant: no restriction
    assert len(allowed(mon(zeros, ctx([t["balance"], t["_cents)"]], 2)), 0)) == len(TOY)
    # a block: root (nothing committed), node 1 "bal" (parent 0), node 2 "ance_c" (parent 1), node 3 "x"
    # (parent 0: refused at the root, so its own mask is that of a dormant row), node 4 ")" below node 2
    blk = np.zeros((1, 5, len(TOY)), np.float32)
    x = mon(blk, ctx([], 0, block=[0, t["bal"], t["ance_c"], t["x"], t[")"]], parents=[-1, 0, 1, 0, 2]))
    assert allowed(x, 0, 0) == ["bal", "balance", "dep", "owner"]
    assert allowed(x, 0, 1) == ["ance", "ance_c"]
    assert allowed(x, 0, 2) == ["ents"]
    assert len(allowed(x, 0, 3)) == len(TOY) and len(allowed(x, 0, 4)) == len(TOY)
    # ".bal" carries the dot and the start of the name inside one token
    assert allowed(mon(zeros, ctx([t["balance"], t["_cents"], t["\n"], t["acct"], t[".bal"]], 5)), 0) == [
        "ance", "ance_c"]
    st = mon.stats()
    assert st["monitor_calls"] == 6 and st["monitor_triggers"] >= 3


def test_jedi_monitor_stops_a_nonexistent_attribute(lm):
    model, params, tok = lm
    ids = [tok.encode(CODE)]
    names = {c.name for c in jedi.Script(CODE).complete(CODE.count("\n") + 1, len(CODE.split("\n")[-1]))
             if not c.name.startswith("_")}
    assert names == {"balance_cents", "deposit_cents", "owner_name"}
    plain = jaxdec.generate(model, params, ids, max_new_tokens=8, tokenizer=tok)
    attr = re.match(r"[A-Za-z_]\w*", plain.text[0]).group(0)
    print(f"unmonitored: acct.{plain.text[0]!r}")
    assert attr not in names, plain.text  # negative control: the model alone invents an attribute
    mon = MonitorProcessor(JediMonitor(CODE, tok))
    g = jaxdec.generate(model, params, ids, max_new_tokens=8, tokenizer=tok, processors=[mon])
    attr = re.match(r"[A-Za-z_]\w*", g.text[0]).group(0)
    st = mon.stats()
    print(f"monitored: acct.{g.text[0]!r}; {st['monitor_calls']} host calls, mean {1e3 * st['monitor_seconds_mean']:.2f}"
          f" ms, p99 {1e3 * st['monitor_seconds_p99']:.2f} ms; jedi {sum(mon.monitor.jedi_seconds):.2f} s")
    assert attr in names, g.text
    assert st["monitor_masked_rows"] >= 1


def test_monitor_bad_input():
    from jaxdec.constrained import Monitor
    with pytest.raises(TypeError, match=r"monitor \(object\) needs a callable pre\(\)"):
        MonitorProcessor(object())
    with pytest.raises(TypeError, match=r"monitor \(Monitor\) needs a tokenizer attribute with decode"):
        MonitorProcessor(Monitor())
    with pytest.raises(TypeError, match=r"JediMonitor: context must be the code text \(str\), got int"):
        JediMonitor(123, ToyTokenizer(TOY))
