# The two front-door commands are `make serve` and `make test`; both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
PORT ?= 3000
TBCM_MODEL ?= student
STUDENT_RUNS ?= runs/student# where `make student` keeps its run (bank, checkpoint, curves)
STUDENT_WEIGHTS ?= weights/student# where `make student` exports the student
SEED ?= 0
WORLD_RUNS ?= runs/world# where `make world` keeps its training runs
WEIGHTS ?= weights# where `make world` ships; point it elsewhere to re-make the world beside the shipped one

.PHONY: install lock check-latest test serve demo gpu-check world teacher teacher-phases student equal-time equal-time-grid docs

LOCK := requirements.lock# every dependency, direct and transitive, at its exact version (made by `make lock`)
SERVE_LOCK := requirements-serve.lock# the same versions, serving's share only: what the bento installs
TORCH := torch==2.13.0# a CPU build from this machine's disk, a CUDA build elsewhere: both satisfy the lock
# The lock installs with pip (which finds the local torch build where uv would not), then the project without deps.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r $(LOCK)
	$(PIP) install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Re-resolve both locks from pyproject's ranges (the newest versions they admit, torch held at $(TORCH)).
lock:
	test -x $(BIN)/uv || { test -x $(BIN)/python || $(PY) -m venv $(VENV); $(PIP) install -q uv; }
	bash tools/lock.sh "$(TORCH)"

# Not in CI: the newest versions pyproject admits, in a throwaway venv, against the fast tests (drift found on purpose).
check-latest: install
	bash tools/check_latest.sh

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

serve: install
	PORT=$(PORT) TBCM_MODEL=$(TBCM_MODEL) $(BIN)/tbcm serve --port $(PORT) --model $(TBCM_MODEL)

demo: install
	$(BIN)/tbcm generate "a large red circle on the left" --model teacher --steps 16 --seed 0 --out runs/demo.png

# Re-make the shipped embedded world (VAE, evaluator, teacher) from the recorded seeds and configs.
world: install
	$(BIN)/tbcm world train-vae --seed $(SEED) --out $(WORLD_RUNS)/vae
	$(BIN)/tbcm world train-evaluator --seed $(SEED) --out $(WORLD_RUNS)/evaluator
	$(MAKE) teacher-phases TEACHER_VAE=$(WORLD_RUNS)/vae
	$(BIN)/tbcm world ship --vae $(WORLD_RUNS)/vae --evaluator $(WORLD_RUNS)/evaluator \
		--teacher $(WORLD_RUNS)/teacher-phase4 --weights $(WEIGHTS)

# Re-make the teacher alone on an existing VAE (default: the shipped one), e.g. at another size:
# make teacher WORLD_RUNS=runs/teacher-8x5 WEIGHTS=runs/teacher-8x5/weights TEACHER_SIZE="--num-layers 8 --heads 5"
teacher: install teacher-phases
	$(BIN)/tbcm world ship --vae $(TEACHER_VAE) --teacher $(WORLD_RUNS)/teacher-phase4 --weights $(WEIGHTS)

TEACHER_VAE ?= weights/teacher# the VAE the teacher's phases train on (a train-vae run or a pipeline folder)
TEACHER_SIZE ?=# the teacher's architecture for all four phases (default 6 layers x 4 heads of 32 channels)
TEACHER = $(BIN)/tbcm world train-teacher $(TEACHER_SIZE) --vae $(TEACHER_VAE)
teacher-phases: install
	$(TEACHER) --seed $(SEED) --out $(WORLD_RUNS)/teacher
	$(TEACHER) --seed $(SEED) --out $(WORLD_RUNS)/teacher-annealed \
		--init-from $(WORLD_RUNS)/teacher/transformer --steps 3000 --warmup-steps 100 --cosine-decay
	# third phase: 12000 fresh training scenes (the next seed's draw), a lower peak lr, annealed again
	$(TEACHER) --seed $(shell expr $(SEED) + 1) --dataset-size 12000 \
		--out $(WORLD_RUNS)/teacher-phase3 --init-from $(WORLD_RUNS)/teacher-annealed/transformer --steps 2000 \
		--lr 2e-4 --warmup-steps 100 --cosine-decay
	# fourth phase: 12000 scenes of a third fresh draw, 4000 steps at a peak lr of 1e-4, annealed
	$(TEACHER) --seed $(shell expr $(SEED) + 2) --dataset-size 12000 \
		--out $(WORLD_RUNS)/teacher-phase4 --init-from $(WORLD_RUNS)/teacher-phase3/transformer --steps 4000 \
		--lr 1e-4 --warmup-steps 100 --cosine-decay

# The shipped student's recipe, defined once: `make student` runs it, and `make equal-time` runs it against data-sCM.
STUDENT_TEACHER ?= weights/teacher# the teacher `make student` and `make equal-time` distill (a pipeline folder)
STUDENT_SOURCE = --teacher $(STUDENT_TEACHER) --prompts world --seed $(SEED)
BANK_SHARDS ?= 8# rollout shards of 256 prompts in the bank; 4 for budgets near 20 minutes (docs/results.md, Table 2)
STUDENT_BANK_OPTS = $(STUDENT_SOURCE) --shards $(BANK_SHARDS) --prompts-per-shard 256 --batch-size 32
STUDENT_RECIPE ?= tbcm+synthetic+dmd# the shipped recipe (tbcm/distill/recipes.py): TBCM pairs + re-noised endpoints + DMD
BUDGET ?= 3600# seconds of wall clock for each method in `make equal-time`
EQUAL_TIME_RUNS ?= runs/equal-time# where `make equal-time` keeps both runs and their evaluations

# Re-make the shipped one-step student from the shipped teacher (image-free), with its eval in the manifest: a bank
# of BANK_SHARDS x 256 teacher rollouts (2048 by default), then 1400 steps of STUDENT_RECIPE on it, exported as
# trained (the EMA weights; no model extrapolation).
student: install
	$(BIN)/tbcm rollout $(STUDENT_BANK_OPTS) --out $(STUDENT_RUNS)/bank
	$(BIN)/tbcm distill --recipe $(STUDENT_RECIPE) $(STUDENT_SOURCE) --rollouts $(STUDENT_RUNS)/bank \
		--out $(STUDENT_RUNS) --export $(STUDENT_WEIGHTS) --export-eval-n 512

# Table 2: that recipe against data-sCM, BUDGET seconds of wall clock each, side by side (benchmarks/equal_time.sh).
equal-time: install
	STUDENT_BANK_OPTS="$(STUDENT_BANK_OPTS)" STUDENT_SOURCE="$(STUDENT_SOURCE)" STUDENT_RECIPE="$(STUDENT_RECIPE)" \
		bash benchmarks/equal_time.sh $(BUDGET) $(EQUAL_TIME_RUNS)

# The symmetric equal-time study: TBCM, endpoint-only synthetic sCM and data-sCM, each with and without DMD's term, 20
# minutes each, training seeds 0 and 1, two at a time (benchmarks/equal_time_grid.py; about 2.5 hours on 2 cores)
equal-time-grid: install
	$(BIN)/python -m benchmarks.equal_time_grid --budget 1200 --seeds 0 1 --out runs/grid --json docs/results/grid-1200.json

gpu-check: install
	bash benchmarks/gpu_check.sh

# Write the numbers tables of README.md and docs/results.md from weights/*/tbcm.json and docs/results/*.json
# (standard library only: no install needed); tests/test_docs.py fails when they are stale.
docs:
	$(PY) tools/docs_table.py
