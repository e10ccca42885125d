"""Masked-diffusion LM decoding (issue 19).

* `jaxdec.diffusion.tasks`: ParallelBench-style tasks (waiting-line list edits, 4x4 Latin squares and
  sudoku), their word-level vocabulary and text format, a seeded generator with a fixed held-out split,
  and graders.
* `jaxdec.diffusion.samplers`: the parallel-decoding schedules (LLaDA, Dream, Fast-dLLM threshold and
  factor, FreeDave, LocalLeap, CreditDecoding, AdaBlock, CCD, secondary remasking, Learn2PD), each one
  jitted ``while_loop`` over (canvas, mask, step, method state) driven by any ``logits_fn(aux, canvas)``;
  greedy, or ``temperature > 0`` sampling with a key per row.
* `jaxdec.diffusion.learn2pd`: Learn2PD's filter (features, flax MLP, extremely-greedy replay labels,
  files) and End-of-Text Prediction.
* `jaxdec.diffusion.model`: small task models (jaxdec's Llama model, tiny config, bidirectional or causal)
  saved as Hugging Face style folders that `jaxdec.load` opens.
* `jaxdec.diffusion.cli`: ``jaxdec generate --method diffusion --sampler NAME``.
* `jaxdec.diffusion.shipped`: the trained task models and Learn2PD filter shipped in the package, by name
  (``diffusion-tasks``, ``diffusion-tasks-ar``, ``learn2pd-diffusion-tasks``), with their provenance.

Training: ``python -m train.masked_diffusion`` (``--objective diffusion|ar``), ``python -m
train.learn2pd_filter --model DIR``; ``make diffusion-models`` retrains what is shipped.
"""
