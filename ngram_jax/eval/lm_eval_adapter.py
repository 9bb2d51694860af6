"""lm-evaluation-harness adapter: an ``lm_eval`` ``LM`` registered as ``ngram_jax``.

    import lm_eval
    from ngram_jax.eval.lm_eval_adapter import NgramJaxLM
    lm = NgramJaxLM(checkpoint="runs/train_tiny")
    lm_eval.simple_evaluate(model=lm, tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(include_path=...))

Scoring is batched: sequences are right-padded to a power-of-two length (at most ``max_length``) and
a fixed batch size, so one jitted program serves each length bucket.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ngram_jax import generate as gen
from ngram_jax import storage
from ngram_jax.data.tokenizer import eos_id, load_tokenizer


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's ``TaskManager`` (reading ``include_path`` too), once every name in ``tasks`` is a task, group
    or tag it knows, a pattern matching one, or a task YAML file: an unknown one is a :class:`UsageError`
    naming it and how to list the available ones (before any model is read)."""
    from lm_eval.tasks import TaskManager

    from ngram_jax.errors import UsageError

    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = set(tm.all_tasks)
    for name in tasks:
        if name in known or tm.match_tasks([name]) or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            continue
        where = f"in {include_path} or the harness" if include_path else "in lm-evaluation-harness"
        listing = "lm-eval ls tasks" + (f" --include_path {include_path}" if include_path else "")
        raise UsageError(f"--tasks {name}: no task, group or tag of that name {where}; list the available ones "
                         f"with `{listing}`, or give --include-path DIR for a directory of task YAMLs")
    return tm


def token_logprobs(model, inputs, targets, segment_ids):
    """log p(target | prefix) [B, L] and whether each target is the argmax [B, L]."""
    logits = model(inputs, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


@register_model("ngram_jax")
class NgramJaxLM(LM):
    def __init__(self, checkpoint: str | None = None, hf_checkpoint: str | None = None, tokenizer: str | None = None,
                 batch_size: int | str = 8, max_length: int | str | None = None, model=None, config=None):
        super().__init__()
        if model is None:
            if checkpoint:
                from ngram_jax.checkpoint import restore_model

                model, config = restore_model(checkpoint)
            elif hf_checkpoint:
                from ngram_jax.convert.hf import load_hf_checkpoint

                model, config = load_hf_checkpoint(hf_checkpoint)
            else:
                raise ValueError("give checkpoint=RUN_DIR, hf_checkpoint=DIR, or model= and config=")
        self.model, self.config = model, config
        tok_path = tokenizer or storage.location(config.data.path, "data.path") / "tokenizer.json"
        self.tok = load_tokenizer(tok_path)
        self.eos = eos_id(self.tok)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or config.data.seq_len)
        self._score = nnx.jit(token_logprobs)

    # -- helpers --------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _score_windows(self, windows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context, continuation) token lists -> (sum of continuation log-probs, all greedy)."""
        out = []
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start : start + self.batch_size]
            seqs = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in chunk]
            longest = max(len(s) - 1 for s in seqs)
            width = min(self.max_length, 1 << max(3, (longest - 1).bit_length()))
            inputs = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros_like(inputs)
            seg = np.zeros_like(inputs)
            for i, s in enumerate(seqs):
                inputs[i, : len(s) - 1], targets[i, : len(s) - 1], seg[i, : len(s) - 1] = s[:-1], s[1:], 1
            logp, greedy = (np.asarray(x) for x in self._score(self.model, inputs, targets, seg))
            for i, ((_, cont), s) in enumerate(zip(chunk, seqs, strict=True)):
                n = min(len(cont), len(s) - 1)
                span = slice(len(s) - 1 - n, len(s) - 1)
                out.append((float(logp[i, span].sum()), bool(greedy[i, span].all())))
        return out

    # -- the LM interface -----------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        windows = []
        for req in requests:
            context, continuation = req.args
            ctx = self._encode(context) if context else [self.eos]
            windows.append((ctx, self._encode(continuation)))
        return self._score_windows(windows)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args[:1]
            rolling = lm_utils.get_rolling_token_windows(token_list=self._encode(text), prefix_token=self.eos,
                                                         max_seq_len=self.max_length, context_len=1)
            windows = [(list(ctx), list(pred)) for ctx, pred in map(lm_utils.make_disjoint_window, rolling)]
            out.append(sum(lp for lp, _ in self._score_windows(windows)))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 64))
            ids = self._encode(context)[-max(1, self.max_length - max_new):] or [self.eos]
            (new,) = gen.generate(self.model, [ids], max_new, temperature=float(kwargs.get("temperature", 0.0)))
            text = self.tok.decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out
