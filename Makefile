# Quick start: `make train` (set up, then train configs/default.py) and `make test`.
# Two tested environments, each pinned by a lock file of exact versions:
#   .venv          Python 3.11, requirements/py3.11.txt: the oldest versions setup.cfg admits
#                  (jax 0.10.2, the newest jax for 3.11); `make setup`, `make test`.
#   .venv-py3.12   Python 3.12, requirements/py3.12.txt: the newest (`make lock` refreshes
#                  it); `make test-py3.12` runs NEWEST_TESTS there, and CI runs both.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/default
PYTEST_ARGS ?=
# The first python3.12 that runs: on PATH, else pyenv's (whose python3.12 shim on PATH fails
# unless 3.12 is a selected pyenv version, as on the CI image).
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 \
  2>/dev/null); do $$p -c '' 2>/dev/null && { command -v $$p; break; }; done)
VENV312 := .venv-py3.12
STAMP312 := $(VENV312)/.installed
# What moves with jax releases: Pallas lowering for TPU and CUDA, the memory layers, the
# optimizers, sharding, data (grain), and train.py end to end with Orbax checkpoints and a
# resume; about a seventh of the suite's time (2-3 minutes on 2 cores).
LOWERING := test_kernels_lower_for_their_platform
NEWEST_TESTS := tests/pallas_kernels/test_linear_memory_kernels.py::$(LOWERING) \
  tests/pallas_kernels/test_neural_memory_kernels.py::$(LOWERING) \
  tests/layers/test_linear_memory_layer.py tests/layers/test_neural_memory_layer.py \
  tests/layers/test_mixture_of_memories.py tests/optim tests/data tests/training/test_sharding.py \
  tests/training/test_train_cli.py::test_tiny_mqar_run_logs \
  tests/training/test_train_cli.py::test_killed_run_resumes_bit_identically

.PHONY: setup train test test-py3.12 lock lint bench clean

setup: $(STAMP)

# Reinstall only when the dependency list or the lock changes.
$(STAMP): setup.cfg pyproject.toml requirements/py3.11.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/py3.11.txt -e ".[test]"
	touch $(STAMP)

$(STAMP312): setup.cfg pyproject.toml requirements/py3.12.txt
	@test -n "$(PYTHON312)" || { echo "error: python3.12 not found (set PYTHON312=...)"; exit 2; }
	test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install --quiet --upgrade pip
	$(VENV312)/bin/python -m pip install --quiet -c requirements/py3.12.txt -e ".[test]"
	touch $(STAMP312)

# The newest releases setup.cfg admits on Python 3.12, resolved in a scratch venv.
lock:
	rm -rf .venv-lock && $(PYTHON312) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e ".[test]"
	{ sed -n 1,2p requirements/py3.12.txt; .venv-lock/bin/python -m pip freeze \
	  --exclude-editable; } > requirements/py3.12.txt.new
	mv requirements/py3.12.txt.new requirements/py3.12.txt && rm -rf .venv-lock

train: $(STAMP)
	$(PY) train.py --config=configs/default.py --workdir=$(WORKDIR)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two pytest workers: most of a test's time is single-threaded XLA compilation.
test: lint
	$(PY) -m pytest -q -m "not slow" -n 2 --durations=10 $(PYTEST_ARGS) tests

test-py3.12: $(STAMP312)
	$(VENV312)/bin/python -c "import jax; print('Python 3.12, jax', jax.__version__)"
	$(VENV312)/bin/python -m pytest -q -m "not slow" -n 2 --durations=5 $(NEWEST_TESTS)

# Single-threaded XLA for the timing benchmarks: on 2 shared cores the multi-threaded
# Eigen pool made the chunked backward much slower (see benchmarks/kernels.py).
BENCH_XLA := XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

# Every kind with a recall target (configs/mqar.py) but ATLAS, which trains at under 1K
# tokens/s on a CPU (the speed issue) and so runs alone, one seed, on both cores.
RECALL_KINDS := attention,deltanet,gdn,yaad,lmm,mag,mal,omeganet,mac,mom

# Long checks and benchmarks: run by hand (several hours on 2 CPU cores); results are
# written to benchmarks/results/. pytest's exit 5 means "no slow tests", which is fine.
JLA_PYTHON ?= /tmp/peer-jla/bin/python
TITANS_PYTHON ?= /tmp/peer-titans/bin/python
bench: $(STAMP)
	$(PY) -m pytest -q -m slow tests || test $$? -eq 5
	XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
	  $(PY) -m benchmarks.kernels --heads=4 --dim=64 --lengths=1024,2048,4096,8192 \
	  --max_reference_length=8192 --repeats=5
	$(PY) -m benchmarks.neural_memory_speed
	$(PY) -m benchmarks.optimizer_memory --d_model 768 --num_layers 12 --mlp_dim 2048 \
	  --vocab_size 32000
	$(PY) -m benchmarks.optimizer_comparison --steps 300
	$(PY) -m benchmarks.tail_end_memory --steps 100
	$(PY) -m benchmarks.tail_end_memory --steps 100 --embeddings gaussian \
	  --out benchmarks/results/tail_end_memory_gaussian
	$(BENCH_XLA) $(PY) -m benchmarks.throughput --steps 20
	taskset -c 0 $(PY) -m benchmarks.miras_parallel_forms
	$(BENCH_XLA) taskset -c 0 $(PY) -m benchmarks.cpu_layouts
	$(BENCH_XLA) $(PY) -m benchmarks.layer_cost --lengths=1024,2048,4096,8192,16384,32768 \
	  --repeats=5 --budget_s=60 --max_memory_gb=4
	$(PY) -m benchmarks.recall_sweep --kinds attention --learning_rates 1e-3,3e-3,1e-2 \
	  --batch_size 32 --num_steps 3000
	$(PY) -m benchmarks.recall_sweep --kinds gdn --learning_rates 1e-3,3e-3,1e-2 \
	  --batch_size 32 --num_steps 1500
	$(PY) -m benchmarks.recall_sweep --kinds attention,gdn --learning_rates 3e-3,1e-2
	$(PY) -m benchmarks.recall_sweep --kinds $(RECALL_KINDS)
	$(PY) -m benchmarks.recall_sweep --kinds $(RECALL_KINDS) --seeds 1
	$(PY) -m benchmarks.recall_sweep --kinds linear_attention,gla
	$(PY) -m benchmarks.recall_sweep --kinds attention --num_kv_pairs 16 --seq_len 128 --seeds 1
	$(PY) -m benchmarks.recall_sweep --kinds gdn --num_kv_pairs 16 --seq_len 128 \
	  --learning_rates 3e-3 --num_steps 4000 --seeds 0,1
	$(PY) -m benchmarks.recall_sweep --kinds atlas --seeds 1 --cores_per_run 2
	$(PY) -m benchmarks.model_comparison --seed 0
	$(PY) -m benchmarks.model_comparison --seed 1
	$(PY) -m benchmarks.context_parallel
	$(PY) -m benchmarks.context_parallel --kinds lmm --seq_lens 4096 --contexts 1,2,4,8 \
	  --rows 1,2 --time_seq_len 4096 --time_kinds lmm
	$(PY) -m benchmarks.plots
	# The peers' interpreters: see benchmarks/peers_envs.md (a missing one gives "not importable" rows).
	$(PY) -m benchmarks.peers --jla_python=$(JLA_PYTHON) --titans_python=$(TITANS_PYTHON) --threads=pinned

clean:
	rm -rf $(VENV) $(VENV312) build *.egg-info .pytest_cache .ruff_cache
