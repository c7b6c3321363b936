"""Run one tiny training stage in this process: `python train_driver.py STAGE DATA RUN_DIR [W2V] [k=v ...]`.

The exact-resume tests start it as a subprocess, kill it with SIGKILL and start it again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_fixtures import finetune_config, pretrain_config  # noqa: E402

from repro.track.jsonl import JsonlTracker  # noqa: E402
from repro.train.stages import run_finetune, run_pretrain  # noqa: E402


def main(argv: list[str]) -> int:
    stage, data_dir, run_dir = argv[0], Path(argv[1]), Path(argv[2])
    rest = argv[3:]
    if stage == "pretrain":
        cfg = pretrain_config(data_dir)
    else:
        w2v = rest.pop(0)
        cfg = finetune_config(data_dir, None if w2v == "none" else w2v)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
    tracker = JsonlTracker(run_dir)
    try:
        (run_pretrain if stage == "pretrain" else run_finetune)(cfg, run_dir, tracker)
    finally:
        tracker.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
