"""The adapter zoo: eight word-relation LoRAs and a multi-task LoRA on SmolLM2-135M-Instruct, each scored on
every task. Writes bench/results/zoo.{json,md} with the machine it ran on. `malleable bench zoo` runs the same
zoo for users (same cache); `bench/merge_quality.py` builds on it.

    python bench/zoo.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads crawl on a shared CPU
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

from malleable.protocols.zoo import ZooSettings, run_zoo, zoo_markdown  # noqa: E402

if __name__ == "__main__":
    result, _ = run_zoo(ZooSettings())
    result["machine"] = machine()
    write_results("zoo", result, zoo_markdown(result))
