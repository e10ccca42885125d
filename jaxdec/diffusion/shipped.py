"""The task models and the Learn2PD filter shipped in the package (issue 19), by name.

* ``diffusion-tasks``: the masked-diffusion task model (``python -m train.masked_diffusion --objective
  diffusion``: 1500 steps from scratch, then 800 more from that model with ``--init-from``), a Hugging Face
  style folder under ``jaxdec/diffusion/shipped/``.
* ``diffusion-tasks-ar``: the autoregressive model of the same size trained on the same data
  (``--objective ar``, 1500 steps): decode it with jaxdec's autoregressive decoders (``--method greedy``).
* ``learn2pd-diffusion-tasks``: the Learn2PD filter of ``diffusion-tasks`` (``python -m
  train.learn2pd_filter``), one ``.safetensors`` file.

``make diffusion-models`` retrains all three and writes them here (the train scripts' ``--ship NAME``).
Each file carries its provenance in the safetensors header, written with the trained-heads artefact
helpers (`jaxdec.speculative.heads.artefact.save_heads` / `read_heads`): ``kind``, ``format``, ``config``,
``fingerprint`` (a model: its training data and size, `train.masked_diffusion.fingerprint`; the filter: the
`target_fingerprint` of the shipped model folder it was trained on), ``command``, ``commit``, ``steps``,
``data_examples``, ``data_tokens``, ``wall_s``, ``final_eval`` and, for a model, ``heldout_exact`` (held-out
exact-match accuracy per task: one token per step for the diffusion model, greedy for the AR model).

Python: ``load_model("diffusion-tasks")`` -> ``(model, params, objective)``; ``load_filter()`` -> the
filter's params (refused with `HeadsMismatch` when the shipped model changed under it); ``provenance(name)``.
CLI: ``jaxdec generate --model diffusion-tasks --method diffusion --sampler NAME`` (``--sampler learn2pd``
uses the shipped filter when ``--learn2pd-filter`` is not given) and ``--model diffusion-tasks-ar --method
greedy``.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")
MODELS = {"diffusion-tasks": "masked_diffusion", "diffusion-tasks-ar": "autoregressive"}
FILTERS = {"learn2pd-diffusion-tasks": "diffusion-tasks"}  # filter name -> the shipped model it filters
MODEL_KIND = "diffusion-task-model"
FILTER_KIND = "learn2pd-filter"
NAMES = tuple(MODELS) + tuple(FILTERS)


def _known(name) -> str:
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"name must be one of the shipped diffusion artefacts {', '.join(NAMES)}, got {name!r}")
    return name


def path_of(name: str) -> str:
    """Where the shipped artefact ``name`` lives (a folder for a model, a .safetensors file for a filter),
    whether or not it is there."""
    _known(name)
    return os.path.join(SHIPPED_DIR, name if name in MODELS else f"{name}.safetensors")


def shipped_path(name: str) -> str:
    """The path of the shipped artefact ``name``; FileNotFoundError naming ``make diffusion-models`` when
    it is missing."""
    p = path_of(name)
    f = os.path.join(p, "model.safetensors") if name in MODELS else p
    if not os.path.isfile(f):
        raise FileNotFoundError(f"shipped diffusion artefact {name!r} is missing ({f!r}); `make diffusion-models` "
                                f"trains and ships it")
    return p


def resolve(name_or_path: str) -> str:
    """A shipped model name -> its folder; anything else is returned unchanged (a path)."""
    return shipped_path(name_or_path) if isinstance(name_or_path, str) and name_or_path in MODELS else name_or_path


def provenance(name: str) -> dict:
    """The provenance metadata of the shipped artefact ``name`` (see the module docstring)."""
    from jaxdec.speculative.heads.artefact import read_heads
    p = shipped_path(name)
    kind = MODEL_KIND if name in MODELS else FILTER_KIND
    return read_heads(os.path.join(p, "model.safetensors") if name in MODELS else p, kind)[1]


def load_model(name: str = "diffusion-tasks", require: Optional[str] = None):
    """``(model, params, objective)`` of a shipped task model (`jaxdec.diffusion.model.load`)."""
    from jaxdec.diffusion.model import load
    if name not in MODELS:
        raise ValueError(f"name must be a shipped task model ({', '.join(MODELS)}), got {name!r}")
    return load(shipped_path(name), require=require)


def load_filter(name: str = "learn2pd-diffusion-tasks"):
    """The params of a shipped Learn2PD filter, checked against the shipped model it was trained for
    (`HeadsMismatch` when that model was retrained without it)."""
    from jaxdec.diffusion import learn2pd as L
    from jaxdec.speculative.heads.artefact import load_heads, target_fingerprint
    if name not in FILTERS:
        raise ValueError(f"name must be a shipped Learn2PD filter ({', '.join(FILTERS)}), got {name!r}")
    path = shipped_path(name)
    load_heads(path, FILTER_KIND, target_fingerprint(shipped_path(FILTERS[name])))
    return L.load_filter(path)


def filter_for(model_name_or_path: str) -> Optional[str]:
    """The shipped filter name of a shipped model name (or its folder), or None."""
    p = os.path.abspath(str(model_name_or_path)) if os.path.exists(str(model_name_or_path)) else None
    for f, m in FILTERS.items():
        if model_name_or_path == m or (p is not None and p == os.path.abspath(path_of(m))):
            return f
    return None


# ------------------------------------------------------------------------------------------ shipping
def heldout_exact(folder: str, tasks, n: int, batch: int = 128) -> dict:
    """Held-out exact-match accuracy per task of a task model folder: one token per step for a
    masked-diffusion model, greedy `jaxdec.generate` for an autoregressive one."""
    import jaxdec
    from jaxdec.diffusion import tasks as T
    from jaxdec.diffusion.model import logits_fn, objective_of
    from jaxdec.diffusion.samplers import SamplerConfig, sample
    m = jaxdec.load(folder)
    obj = objective_of(folder)
    out = {}
    for task in tasks:
        ex = T.heldout(task, n)
        ok = []
        for i in range(0, len(ex), batch):
            part = ex[i:i + batch]
            prompts = [T.encode(e.prompt) for e in part]
            if obj == "masked_diffusion":
                toks = sample(logits_fn(m.model), m.params, prompts, T.GEN_LEN,
                              SamplerConfig("one-per-step", mask_id=T.MASK_ID, pad_id=T.PAD_ID))[0].tolist()
            else:
                toks = jaxdec.generate(m.model, m.params, prompts, max_new_tokens=T.GEN_LEN).tokens
            ok += [T.grade(e.prompt, T.decode(t)) for e, t in zip(part, toks)]
        out[task] = sum(ok) / len(ok)
    return out


def ship_model(folder: str, name: str, facts: dict, log=print) -> str:
    """Copy the task model ``folder`` to the shipped model ``name``: config and tokenizer as they are,
    the weights re-written with the provenance ``facts`` (must hold ``fingerprint``; ``command``,
    ``steps``, ... as `save_heads` facts) in the safetensors header. Returns the shipped folder."""
    from safetensors.numpy import load_file
    from jaxdec.diffusion.model import objective_of
    from jaxdec.speculative.heads.artefact import save_heads
    if name not in MODELS:
        raise ValueError(f"name must be a shipped task model ({', '.join(MODELS)}), got {name!r}")
    if objective_of(folder) != MODELS[name]:
        raise ValueError(f"{folder!r} holds a {objective_of(folder)!r} model; {name!r} ships a {MODELS[name]!r} one")
    import json
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    dest = path_of(name)
    tmp = dest + f".{os.getpid()}.tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for fn in os.listdir(folder):
        if fn != "model.safetensors":
            shutil.copy2(os.path.join(folder, fn), os.path.join(tmp, fn))
    facts = dict(facts)
    fp = facts.pop("fingerprint")
    save_heads(os.path.join(tmp, "model.safetensors"), MODEL_KIND, load_file(os.path.join(folder, "model.safetensors")),
               {"objective": MODELS[name], **cfg.get("jaxdec_task_model", {})}, fp, name=name, **facts)
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    log(f"shipped {name}: {dest} ({sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest)) / 2**20:.1f} MiB)")
    return dest


def ship_filter(params, name: str, facts: dict, log=print) -> str:
    """Write the shipped filter ``name`` (its params and provenance ``facts``), fingerprinted with the
    shipped model it filters. Returns the path."""
    from jaxdec.diffusion import learn2pd as L
    from jaxdec.speculative.heads.artefact import save_heads, target_fingerprint
    if name not in FILTERS:
        raise ValueError(f"name must be a shipped Learn2PD filter ({', '.join(FILTERS)}), got {name!r}")
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict
    plain = unflatten_dict(flatten_dict(jax.device_get(params)))  # plain nested dicts of numpy arrays
    path = save_heads(path_of(name), FILTER_KIND, plain,
                      {"hidden": L.hidden_of(params), "features": L.NFEAT},
                      target_fingerprint(shipped_path(FILTERS[name])), name=name, target=FILTERS[name], **facts)
    log(f"shipped {name}: {path} ({os.path.getsize(path) / 2**10:.1f} KiB)")
    return path
