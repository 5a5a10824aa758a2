# Two commands do all the set-up on a fresh clone:
#   make demo   - create .venv if needed, then run the annotate job on its embedded default
#   make test   - create .venv if needed, then run the whole test suite
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test clean

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
