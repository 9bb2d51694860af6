"""Train a model: ``python train.py configs/models/tiny_ne.yaml [key=value ...]``.

Resumes from the latest checkpoint in ``train.run_dir``; SIGTERM/SIGINT save and exit.
"""

import sys

from ngram_jax.checkpoint import CheckpointError
from ngram_jax.config import ConfigError, load_config
from ngram_jax.train.loop import TrainingDiverged, train


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
        result = train(cfg)
    except (ConfigError, TrainingDiverged, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if "eval_loss" in result:
        print(f"held-out loss {result['eval_loss']:.4f}, perplexity {result['eval_ppl']:.2f} at step {result['step']}")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
