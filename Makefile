# Two commands do all the set-up on a fresh clone:
#   make demo   - create .venv if needed, then run the annotate job on its embedded default
#   make test   - create .venv if needed, then run the whole test suite
#   make shapes-model - build the Shapes-GRES model from nothing into checkpoints/ (dataset, CLIP, SAM base, LLaVA
#                 base, GSVA fine-tuning, evaluation on the test split; 55:50 measured); the shipped checkpoints are
#                 not one chain's: see README "The shipped Shapes-GRES model"
#   make shapes-sam-base / shapes-gsva / shapes-eval - one stage again on the bases in checkpoints/
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test clean shapes-model shapes-sam-base shapes-gsva shapes-eval

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Local Ray keeps token authentication on (the token is kept in ~/.ray/auth_token) and listens on 127.0.0.1.
demo: $(STAMP)
	$(VENV)/bin/python -m jobs.annotate

test: $(STAMP)
	$(VENV)/bin/ruff check gsva pipeline jobs tests bench
	$(VENV)/bin/python -m pytest -q --timeout=900; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo 'pytest collected no tests' >&2; fi; exit $$rc

clean:
	rm -rf data outputs .pytest_cache

# ---------------------------------------------------------------------------------------- shapes-model
# Every stage is one train job (Ray Train, checkpoints, curve; its export holds the curve, history.json and
# run.json with the stage's wall time). Only the training split trains; val scores each stage's curve.
# bf16 autocast and 2 torch threads: measured the fastest on a 2-core CPU for every stage (bench/train_step_bench.py).
# CACHE=--cache-data: the 3200 training images are decoded once, not in every epoch (the clip stage's 400 steps:
# 109.5 s against 128.9 s streamed). The SAM stage streams (SAM_CACHE=) because the streamed run is the shipped SAM
# base bit for bit; SAM_CACHE=--cache-data is faster (11:40 against 14:09-19:14 for 3000 steps, other days) but
# draws another order, so another base.
CACHE ?= --cache-data
SAM_CACHE ?=
PY := OMP_NUM_THREADS=1 $(VENV)/bin/python
SHAPES := data/shapes4k/tasks
SEED1 := data/shapes-seed1/tasks
RUNS := outputs/shapes-model
TRAIN := --data $(SHAPES) --val-data $(SHAPES) --threads-per-worker 2 --precision bf16 --report-every 10
RUN := $(TRAIN) $(CACHE)
RECORDS := history.json run.json training_curve.png
OBJECTS := --objects $(SHAPES)/raw/instances.json
PREPARE := $(PY) -m jobs.prepare --format shapes --num-images 4000 --seed 0 --out $(SHAPES)
CLIP_STEPS ?= 3000
SAM_STEPS ?= 3000
ALIGN_STEPS ?= 300
LLAVA_STEPS ?= 4000
LLAVA_LR ?= 5e-4
GSVA_STEPS ?= 1800
# SAM_DENSE=1: the SAM base's image embedding also learns each object's class and box (3000 steps: object-cell
# accuracy 0.80); GSVA_POLICY=llm: SAM's image encoder stays frozen, as in GSVA's own recipe. Measured against the
# earlier SAM_STEPS=1200 SAM_DENSE=0 GSVA_POLICY=llm-sam in docs/shapes-gres-research.md.
SAM_DENSE ?= 1
GSVA_POLICY ?= llm
# [SEG] and [REJ] start from the rows of the words the LLaVA base answers `{phrase}:` with (a row word for a
# present phrase, "none" for an absent one); GSVA_INIT= starts them as new random rows (README: measured both).
GSVA_INIT ?= --seg-words top upper middle lower bottom --rej-words none

# From nothing: dataset, CLIP, SAM base, LLaVA base, GSVA, evaluation.
shapes-model: $(STAMP)
	rm -rf $(RUNS)
	$(PREPARE)
	$(PY) -m jobs.train --stage clip $(OBJECTS) --preset shapes $(RUN) --batch-size 32 --max-steps $(CLIP_STEPS) \
	  --lr 1e-3 --warmup-steps 100 --checkpoint-every 500 --val-max-images 100 --output $(RUNS)/clip \
	  --export $(RUNS)/clip-export
	$(MAKE) shapes-sam-base
	$(PY) -m jobs.train --stage llava --policy projector $(OBJECTS) --init $(RUNS)/clip-export $(RUN) \
	  --batch-size 16 --lr 1e-3 \
	  --max-steps $(ALIGN_STEPS) --checkpoint-every $(ALIGN_STEPS) --val-max-images 50 \
	  --output $(RUNS)/llava-align --export $(RUNS)/llava-align-export
	$(PY) -m jobs.train --stage llava --policy mllm $(OBJECTS) --init $(RUNS)/llava-align-export $(RUN) \
	  --batch-size 8 --lr $(LLAVA_LR) --warmup-steps 100 --max-steps $(LLAVA_STEPS) --checkpoint-every 500 --val-max-images 50 \
	  --output $(RUNS)/llava --export checkpoints/shapes-llava-base --export-dtype float16
	for stage in clip llava-align; do mkdir -p checkpoints/shapes-llava-base/stages/$$stage && \
	  (cd $(RUNS)/$$stage-export && cp $(RECORDS) $(CURDIR)/checkpoints/shapes-llava-base/stages/$$stage/) || exit 1; \
	done
	$(MAKE) shapes-gsva
	$(MAKE) shapes-eval

$(SHAPES)/_prepare.json: | $(STAMP)
	$(PREPARE)

# One stage alone (its run folder starts empty), e.g. `make shapes-sam-base shapes-gsva shapes-eval` rebuilds the
# SAM base and GSVA on the LLaVA base in checkpoints/.
shapes-sam-base: $(STAMP) $(SHAPES)/_prepare.json
	rm -rf $(RUNS)/sam
	$(PY) -m jobs.train --stage sam $(OBJECTS) --preset shapes $(TRAIN) $(SAM_CACHE) --batch-size 4 --max-steps $(SAM_STEPS) \
	  --checkpoint-every 1000 --val-max-images 50 --dense-weight $(SAM_DENSE) --output $(RUNS)/sam \
	  --export checkpoints/shapes-sam-base --export-dtype float16

shapes-gsva: $(STAMP) $(SHAPES)/_prepare.json
	rm -rf $(RUNS)/gsva
	$(PY) -m jobs.train --sam-base checkpoints/shapes-sam-base --llava-base checkpoints/shapes-llava-base $(RUN) \
	  --policy $(GSVA_POLICY) --batch-size 8 --max-steps $(GSVA_STEPS) --checkpoint-every 900 --val-max-images 100 \
	  --output $(RUNS)/gsva --export checkpoints/shapes-gres --export-dtype float16 $(GSVA_INIT)

# Test split, generate and teacher-forced modes, scored by the score job (ReLA protocol); per-template table;
# then generate mode on the test split of a freshly generated set with another seed.
shapes-eval: $(STAMP) $(SHAPES)/_prepare.json
	for mode in generate teacher-forced; do \
	  $(PY) -m jobs.annotate --input $(SHAPES)/test-00000.parquet --checkpoint checkpoints/shapes-gres \
	    --mode $$mode --output $(RUNS)/eval/$$mode --overwrite && \
	  $(PY) -m jobs.score --predictions $(RUNS)/eval/$$mode/predictions --ground-truth $(SHAPES)/test-00000.parquet \
	    --out $(RUNS)/eval/$$mode/score && \
	  $(PY) bench/shapes_probe.py templates --predictions $(RUNS)/eval/$$mode/predictions --data $(SHAPES) \
	    --split test --threads 1 --out $(RUNS)/eval/$$mode/templates.json || exit 1; \
	done
	test -f $(SEED1)/test-00000.parquet || $(PY) -m jobs.prepare --format shapes --num-images 2000 --seed 1 --out $(SEED1)
	$(PY) -m jobs.annotate --input $(SEED1)/test-00000.parquet --checkpoint checkpoints/shapes-gres \
	  --mode generate --output $(RUNS)/eval-seed1/generate --overwrite
	$(PY) -m jobs.score --predictions $(RUNS)/eval-seed1/generate/predictions \
	  --ground-truth $(SEED1)/test-00000.parquet --out $(RUNS)/eval-seed1/generate/score
