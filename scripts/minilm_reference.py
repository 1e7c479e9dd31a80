#!/usr/bin/env python3
"""Reference sentence embeddings for all-MiniLM-L6-v2, computed by a plain numpy BERT.

This is an independent second code path for the Rust encoder in src/embed.rs: the
tokenizer is the Python `tokenizers` package reading the same tokenizer.json, and the
forward pass is written out here in numpy (float64 arithmetic on the float32 weights),
so nothing is shared with candle except the model files.

Pipeline (what sentence-transformers does for this model): tokenize (truncation at 256
tokens, [CLS] ... [SEP]), BERT forward (embeddings + LayerNorm, 6 layers of masked
self-attention and a GELU (erf form) feed-forward, post-LayerNorm), mean pooling over
the tokens the attention mask keeps, L2 normalisation.

The sentences are encoded one at a time and also as one right-padded batch; the script
fails if the two disagree (that would mean padding leaks into the result).

Usage:
    python3 scripts/minilm_reference.py assets/minilm > tests/data/minilm_reference.json

Needs numpy, safetensors and tokenizers (no torch).
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

MAX_TOKENS = 256

SENTENCES = [
    "A man is playing a guitar.",
    "Crème brûlée au café — naïve Zoë's 東京 recipe ☕",
    "Toy Story (1995): a cowboy doll is profoundly threatened and jealous when a new "
    "spaceman figure supplants him as top toy in a boy's room, and the two rivals must "
    "learn to work together when they are lost in the world outside.",
    "hello",
]


def erf(x):
    # numpy has no erf; vectorise math.erf (exact to double precision).
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def linear(x, w, b):
    # torch layout: weight is [out, in]
    return x @ w.T + b


class NumpyBert:
    def __init__(self, model_dir: Path):
        cfg = json.loads((model_dir / "config.json").read_text())
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.hidden = cfg["hidden_size"]
        self.eps = cfg["layer_norm_eps"]
        assert cfg["hidden_act"] == "gelu"
        raw = load_file(str(model_dir / "model.safetensors"))
        self.w = {k: v.astype(np.float64) for k, v in raw.items() if v.dtype != np.int64}

    def p(self, name):
        return self.w[name]

    def forward(self, ids, mask):
        """ids, mask: int arrays [batch, seq]. Returns hidden states [batch, seq, hidden]."""
        b, s = ids.shape
        x = (
            self.p("embeddings.word_embeddings.weight")[ids]
            + self.p("embeddings.position_embeddings.weight")[np.arange(s)][None, :, :]
            + self.p("embeddings.token_type_embeddings.weight")[np.zeros_like(ids)]
        )
        x = layer_norm(
            x,
            self.p("embeddings.LayerNorm.weight"),
            self.p("embeddings.LayerNorm.bias"),
            self.eps,
        )
        hd = self.hidden // self.heads
        # additive key mask: 0 where kept, very negative where padded
        bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
        for i in range(self.layers):
            pre = f"encoder.layer.{i}."

            def lin(name, t):
                return linear(t, self.p(pre + name + ".weight"), self.p(pre + name + ".bias"))

            def split(t):
                return t.reshape(b, s, self.heads, hd).transpose(0, 2, 1, 3)

            q = split(lin("attention.self.query", x))
            k = split(lin("attention.self.key", x))
            v = split(lin("attention.self.value", x))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + bias
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs = probs / probs.sum(axis=-1, keepdims=True)
            ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, self.hidden)
            x = layer_norm(
                lin("attention.output.dense", ctx) + x,
                self.p(pre + "attention.output.LayerNorm.weight"),
                self.p(pre + "attention.output.LayerNorm.bias"),
                self.eps,
            )
            h = gelu(lin("intermediate.dense", x))
            x = layer_norm(
                lin("output.dense", h) + x,
                self.p(pre + "output.LayerNorm.weight"),
                self.p(pre + "output.LayerNorm.bias"),
                self.eps,
            )
        return x

    def embed(self, id_lists):
        s = max(len(ids) for ids in id_lists)
        ids = np.zeros((len(id_lists), s), dtype=np.int64)
        mask = np.zeros((len(id_lists), s), dtype=np.int64)
        for r, row in enumerate(id_lists):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        hidden = self.forward(ids, mask)
        m = mask[:, :, None].astype(np.float64)
        pooled = (hidden * m).sum(axis=1) / m.sum(axis=1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    model_dir = Path(sys.argv[1])
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_TOKENS)
    bert = NumpyBert(model_dir)

    id_lists = [tok.encode(t).ids for t in SENTENCES]
    assert any(len(ids) > 40 for ids in id_lists), "need one sentence longer than 40 tokens"
    single = np.stack([bert.embed([ids])[0] for ids in id_lists])
    batch = bert.embed(id_lists)
    gap = float(np.abs(single - batch).max())
    print(f"max |single - batch| = {gap:.3e}", file=sys.stderr)
    assert gap < 1e-9, "padding changed the embeddings"

    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "max_tokens": MAX_TOKENS,
        "pooling": "mean over attention mask, then L2 normalisation",
        "generator": "scripts/minilm_reference.py (numpy float64 forward)",
        "sentences": [
            {
                "text": text,
                "ids": ids,
                "embedding": [float(f"{v:.7g}") for v in emb],
            }
            for text, ids, emb in zip(SENTENCES, id_lists, single)
        ],
    }
    json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
