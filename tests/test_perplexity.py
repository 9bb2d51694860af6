"""Bits per byte counts the UTF-8 bytes of whole decoded sequences (not token by token)."""

import json
import math

import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ngram_jax.config import load_config
from ngram_jax.data.prepare import prepare
from ngram_jax.data.tokenizer import EOS_TOKEN, train_bpe
from ngram_jax.eval.perplexity import evaluate
from ngram_jax.model import build_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A naïve café owner sold crème brûlée to the façade painter.",
    "Tokyo is 東京 and Kyoto is 京都 in the old script of the land.",
    "Shall I compare thee to a summer's day? Thou art more lovely.",
    "Über alles: the Ärzte and the Öfen of the north, señor.",
    "To be, or not to be, that is the question of the day.",
] * 3


def metaspace_bpe(texts, vocab_size):
    """SentencePiece-style: words carry a leading '▁' that the decoder turns into a space except at
    the start of the text, so a token decoded alone loses its space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                                       show_progress=False))
    return tok


@pytest.mark.parametrize("kind", ["metaspace", "byte_level"])
def test_bits_per_byte_counts_the_bytes_of_the_decoded_text(kind, tmp_path):
    tok = metaspace_bpe(TEXTS, 200) if kind == "metaspace" else train_bpe(TEXTS, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prepare([docs], tmp_path / "data", tokenizer=tmp_path / "tokenizer.json", heldout_fraction=1.0)

    # the truth: a document's scored targets are all its tokens but the first (+ EOS, no bytes)
    truth = per_token = targets = 0
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        truth += len(text.encode()) - len(tok.decode(ids[:1]).encode())
        per_token += sum(len(tok.decode([i]).encode()) for i in ids[1:])
        targets += len(ids)  # len(ids) - 1 tokens and the EOS
    assert abs(per_token / truth - 1) > 0.01, (per_token, truth)  # the case really separates the two counts

    cfg = load_config("configs/models/tiny_dense.yaml", [
        f"model.vocab_size={tok.get_vocab_size()}", f"model.eos_id={tok.token_to_id(EOS_TOKEN)}", "model.d_model=32",
        "model.ffn_dim=32", "model.num_blocks=1", "model.attention.q_lora_rank=16", "model.attention.kv_lora_rank=16",
        "model.attention.qk_nope_head_dim=8", "model.attention.v_head_dim=8", "model.attention.qk_rope_head_dim=8",
        "model.attention.num_heads=2"])
    model = build_model(cfg, nnx.Rngs(0))
    result = evaluate(model, tmp_path / "data", seq_len=64, batch_size=4)
    assert result["tokens"] == targets  # every target scored once (documents are shorter than a row)
    want = result["loss"] * result["tokens"] / math.log(2) / truth
    np.testing.assert_allclose(result["bits_per_byte"], want, rtol=1e-6)
    assert result["bytes"] == truth
