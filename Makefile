# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make run    install, prepare the embedded model, run the default job
#   make test   install, prepare the embedded model, run the whole test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= runs/default
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: install prepare run test bench clean figures evidence evidence-tables converged converged-gpu docs docs-reference

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when the dependency list changes. pyproject.toml holds ranges; constraints.txt
# pins the exact, tested versions (CPU torch included), so this install is reproducible.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[backends,test]'
	touch $@

install: $(VENV)/.installed

prepare: install
	$(BIN)/cogprobe prepare

run: prepare
	$(BIN)/cogprobe run --out $(OUT)

# Two test processes or more (pytest-xdist), a test module to each (some modules build on the folders
# of their earlier tests, so a module stays in one process): the suite is mostly single-threaded
# Python on tiny models (tests/conftest.py sets one torch thread), so a second process nearly halves it
# (2-core Xeon, 2026-12-06: 7:17 against 13-15 minutes in one process). `pytest` alone still runs serially.
test: prepare
	$(BIN)/pytest -q -n auto --maxprocesses 4 --dist loadscope

bench: prepare
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache site

# The docs site (docs/, mkdocs.yml) into site/; --strict: a broken link or a missing page fails the build.
$(VENV)/.docs-installed: pyproject.toml constraints.txt | $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[docs]'
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Rewrite the generated pages (docs/cli.md, docs/python.md, architecture.md's schemas) from the code.
docs-reference: install
	$(BIN)/python analyses/docs_reference.py

# Re-draw the published figures (figures/) from the default study folder.
figures:
	for s in specialization_heatmaps specialization_curves conditional_gain logit_lens comparison comparison_intervals; do \
		$(BIN)/python analyses/$$s.py $(OUT) || exit 1; done

# The evidence study (README "The evidence study"): tens of hours on a 2-core CPU, so it resumes:
# rerun `make evidence` to continue. Both languages side by side, one thread each; fails if either
# fails. Then its tables, figures and README block (also alone: `make evidence-tables`, on a study
# still running: the README then gets its status only).
EVIDENCE = analyses/evidence
evidence: prepare
	$(BIN)/cogprobe run --preset standard --corpus axolotl --out $(EVIDENCE)/axolotl --threads 1 --no-sweep-controls --budget-no-set skip & a=$$!; \
	$(BIN)/cogprobe run --preset standard --corpus tsunkua --out $(EVIDENCE)/tsunkua --threads 1 --eval-pairs 213 --no-sweep-controls --budget-no-set skip & b=$$!; \
	wait $$a; ra=$$?; wait $$b; rb=$$?; [ $$ra -eq 0 ] && [ $$rb -eq 0 ]
	$(MAKE) evidence-tables

# The converged, matched study on Otomi (issue 39 item 3; cogprobe/study/presets/converged.toml): hours
# on this 2-core CPU, so it resumes: rerun `make converged` to continue it (a run cut off mid-way goes
# on from its last resume checkpoint, at most 50 steps back; finished trials and compared runs are kept
# in the study folder, whose small files are committed, runs/ not). Two runs train at once, one thread
# each (--parallel-runs 2 --threads 1): a step takes ~2.1 s at one thread against ~1.7 s at two, so two
# at once train ~1.6x the steps per hour (2-core Xeon, 2026-12-06). Give it the cores: two threads
# beside other torch jobs (the test suite and a selection) took 50-80 s a step instead of ~1.7 s
# (2026-12-06). A long study is best run from a worktree pinned at a commit, so that changing main
# never changes the code under it:
#   git worktree add ../pinned HEAD && cd ../pinned && PYTHONPATH=$PWD $(CURDIR)/.venv/bin/python -m cogprobe run \
#       --preset converged --out $(CURDIR)/$(EVIDENCE)/converged-tsunkua --threads 1 --parallel-runs 2
converged: prepare
	$(BIN)/cogprobe run --preset converged --out $(EVIDENCE)/converged-tsunkua --threads 1 --parallel-runs 2

# The same study on one CUDA GPU with 5 seeds (issue 39, "On a GPU"), in a folder of its own: CPU and GPU
# kernels give siblings, not copies, so the two studies are read apart, never pooled. Four runs train at
# once, four CPU threads each. Not yet run: no GPU has been lent to this project's sessions, so its cost
# is not measured. It refuses to start without CUDA.
converged-gpu: prepare
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'converged-gpu: no CUDA device here; run it on a GPU machine (make converged is the CPU study)')"
	$(BIN)/cogprobe run --preset converged --seeds 0,1,2,3,4 --out $(EVIDENCE)/converged-tsunkua-cuda --threads 4 --parallel-runs 4

evidence-tables:
	$(BIN)/python analyses/evidence.py nahuatl=$(EVIDENCE)/axolotl otomi=$(EVIDENCE)/tsunkua
	$(BIN)/python analyses/evidence_figures.py nahuatl=$(EVIDENCE)/axolotl otomi=$(EVIDENCE)/tsunkua
	$(BIN)/python analyses/evidence_readme.py
