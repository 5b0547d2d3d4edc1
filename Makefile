# Two commands do all setup on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this torch release is what the project is tested with; override for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
SAMPLE := CaLIDUpsample/Resources/SampleData/CaLIDSample_SCD0000101_phase07.nrrd
OUT ?= output
SAMPLE_NOTE := The sample is a crop of Sunnybrook SCD0000101, one of the 5 cines the default model was fine-tuned \
	on: its scores here are optimistic (README: scores on scans it has not seen)

.PHONY: install demo screenshot test benchmark evaluate evaluate-segmentation clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	mkdir -p $(OUT)
	$(VENV)/bin/calid upsample $(SAMPLE) $(OUT)/sample_x4.nrrd --factor 4 --device auto
	$(PY) -m calid.preview $(SAMPLE) $(OUT)/sample_x4.nrrd $(OUT)/sample_demo.png --device auto --note "$(SAMPLE_NOTE)"
	@echo "demo: wrote $(OUT)/sample_x4.nrrd and $(OUT)/sample_demo.png"

# The README's picture (and the extension catalog's screenshot) is the demo's figure.
screenshot: demo
	cp $(OUT)/sample_demo.png Resources/Screenshot01.png

test: install
	$(PY) -m pytest -q

benchmark: install
	$(PY) Testing/Benchmarks/benchmark_upsample.py

# The bundled model's validation table (README): its own validation patients, read from its model card.
ACDC ?= ../shared/data/acdc/training
MODEL_CARD := CaLIDUpsample/calid/models/calid-acdc/model.json
evaluate: install
	$(VENV)/bin/calid evaluate $(ACDC) --output $(OUT)/evaluation --patients $(MODEL_CARD) --factor 2 --factor 4 --uncertainty \
		--device auto --threads 2 --montage --progress none

# The segmentation table (README): same validation patients, K=2, against morphological contour interpolation.
evaluate-segmentation: install
	$(VENV)/bin/calid evaluate-segmentation $(ACDC) --output $(OUT)/evaluation --patients $(MODEL_CARD) --factor 2 \
		--shape-mm 0.5 --device auto --threads 2 --progress none

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
