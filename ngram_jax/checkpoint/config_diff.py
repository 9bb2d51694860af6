"""How a checkpoint's config differs from the config of the run that resumes (or warm-starts) from it:
the run-control keys may differ, any other difference is refused by the caller."""

from __future__ import annotations

from ngram_jax.config import Config, migrate, to_dict

# Keys that may differ between a checkpoint and the run resuming it (run control, not the model).
# train.steps is checked on its own by the training loop (it shapes the learning-rate schedule: a change
# needs train.extend=true).
RUN_CONTROL_KEYS = ("train.steps", "train.extend", "train.init_from", "train.log_every", "train.eval_every",
                    "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints", "train.progress",
                    "train.run_dir", "train.peak_flops_per_device", "train.loss_chunks", "data.path", "data.bundled",
                    "mesh.ici", "mesh.dcn", "name")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, requested: Config, ignore: tuple[str, ...] = RUN_CONTROL_KEYS) -> list[str]:
    """``key: saved -> requested`` for every key that differs, the keys (and sections) in ``ignore``
    (by default the run-control keys) excepted. A key the saved config lacks (added to the schema after
    the save, e.g. ``train.freeze_target``) counts as its default value."""
    a, b = _flatten(migrate(saved)), _flatten(to_dict(requested))
    defaults = _flatten(to_dict(Config()))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in ignore):
            continue
        va, vb = a.get(key, defaults.get(key)), b.get(key)
        if isinstance(va, list):
            va = _tuplify(va)
        if isinstance(vb, list):
            vb = _tuplify(vb)
        if va != vb:
            diffs.append(f"{key}: checkpoint {va!r} -> requested {vb!r}")
    return diffs


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x
