"""Train a model: ``python train.py configs/models/tiny_ne.yaml [key=value ...]``.

Resumes from the latest checkpoint in ``train.run_dir``; SIGTERM/SIGINT save and exit. Bad input
(config, data, checkpoint, mesh) prints one line ``error: ...`` and exits non-zero (docs/TROUBLESHOOTING.md,
"Troubleshooting").
"""

import sys

from ngram_jax import cli
from ngram_jax.errors import UsageError

USAGE = "python train.py CONFIG.yaml [key.path=value ...]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not argv:
        raise UsageError(f"give a config file: {USAGE}, e.g. python train.py configs/train_tiny.yaml")
    if "=" in argv[0] and not argv[0].endswith((".yaml", ".yml")):
        raise UsageError(f"the first argument must be a config file, got {argv[0]!r}: {USAGE}")
    from ngram_jax.config import load_config

    cfg = load_config(argv[0], argv[1:])  # config errors before JAX is even imported
    from ngram_jax.storage import config_locations

    config_locations(cfg)  # and malformed locations (s4://..., gs:/one-slash)
    from ngram_jax.train.loop import train

    result = train(cfg)
    if "eval_loss" in result:
        print(f"held-out loss {result['eval_loss']:.4f}, perplexity {result['eval_ppl']:.2f} at step {result['step']}")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
