"""`make demo`: the main job on the embedded default.

For now: generate toyworld shards and print their summary. (Training and
evaluation join this once the model and train loop land.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN = Path("runs/demo")


def main() -> None:
    data = RUN / "data"
    for split, n, seed in (("train", 64, 0), ("eval", 16, 1)):
        subprocess.run([sys.executable, "-m", "data_gen.toyworld", "--num-videos", str(n), "--seed", str(seed),
                        "--out", str(data / split)], check=True)
    summary = subprocess.run([sys.executable, "-m", "data_gen.inspect", str(data / "train")], check=True,
                             capture_output=True, text=True).stdout
    print(json.dumps(json.loads(summary), indent=1))


if __name__ == "__main__":
    main()
