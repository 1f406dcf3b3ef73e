"""Built-in benchmark specs, kept as YAML text in the package so no package-data setup is needed.

``infscope bench list`` shows them; ``infscope bench run NAME --out DIR`` runs one. A spec file
written by hand uses exactly the same format (see :mod:`infscope.bench.config`).
"""

from __future__ import annotations

QUICK = """
name: quick
description: >-
  Smoke benchmark in minutes: the tiny 2-layer Llama on a small sentence-transformation task,
  20% balanced noise, one seed, every method.
axes:
  datasets:
    - {name: sentence_transform, classes: 4, train_per_class: 10, val_per_class: 2}
  noise:
    - {strategy: balanced, ratio: 0.2}
  models:
    - {name: tiny-llama, epochs: 2, max_length: 64}
  methods: [default]
  seeds: [0]
"""

DEMO = """
name: demo
description: >-
  The `infscope demo` setting (PipelineConfig defaults: sentence_transform with 10 classes x 12
  training rows, 20% noise mixing grammar, semantic, quality and response swaps, SmolLM2-135M with LoRA r=8, 2 epochs) over three seeds,
  so every number gets a mean and a 95% interval; the DataInf reference loop and kronfluence (EK-FAC and
  identity) run on each run and are compared with ours (dattri's TracIn alone takes several minutes
  per SmolLM2 run here: run dattri on one run with benchmarks/peers.py).
axes:
  datasets: [sentence_transform]
  noise:
    - {weights: {grammar: 0.3, semantic: 0.2, quality: 0.2, response_swap: 0.3}, ratio: 0.2, label: demo}
  models: [smollm2-135m]
  methods: [default]
  seeds: [0, 1, 2]
  peers: [reference_datainf, kronfluence_ekfac, kronfluence_identity]
"""

DATAINF_PAPER = """
name: datainf-paper
description: >-
  The DataInf paper's experiments on our generators: class attribution (AUC and recall of each
  query's top-scored training rows sharing its class) on the three synthetic tasks without noise,
  with SmolLM2-135M; and label-flip detection (uniform flips of 20% of labels) on the
  classification version of sentence transformation with MiniLM (3 epochs), by AUROC and detection curve,
  with the DataInf reference loop, kronfluence and cleanlab side by side (dattri: benchmarks/peers.py).
axes:
  methods: [datainf, hessian_free, exact, lissa]
  seeds: [0, 1, 2]
grids:
  - datasets: [sentence_transform, math_no_reason, math_reason]
    noise:
      - {ratio: 0}
    models: [smollm2-135m]
    attribution: true
  - datasets: [sentence_transform_cls]
    noise:
      - {weights: {label: 1}, ratio: 0.2}
    models: [{name: minilm, epochs: 3}]
    methods: [datainf, hessian_free, exact, lissa, loss, random]
    peers: [reference_datainf, kronfluence_ekfac, kronfluence_identity, cleanlab]
"""

BUILTIN_SPECS: dict[str, str] = {"quick": QUICK, "demo": DEMO, "datainf-paper": DATAINF_PAPER}
