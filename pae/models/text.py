"""Character-level language models: a stacked LSTM and a small decoder-only Transformer.

Both map int tokens ``[B, T]`` to next-token logits ``[B, T, vocab]``. Neither has BatchNorm:
``mask`` is accepted (one call signature for every model) and ignored.
"""
import jax.numpy as jnp
from flax import linen as nn


class CharLSTM(nn.Module):
    """Embedding -> ``layers`` LSTMs of ``hidden`` units -> Dense(vocab).

    Flax's LSTMCell has one bias per gate (PyTorch has two), so a layer holds
    ``4 * (in * hidden + hidden * hidden + hidden)`` parameters.
    """

    vocab_size: int
    embed: int = 128
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens, train: bool = False, *, mask=None):
        del mask
        x = nn.Embed(self.vocab_size, self.embed)(tokens)
        for _ in range(self.layers):
            x = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(x)
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.vocab_size)(x)


class DecoderBlock(nn.Module):
    width: int
    heads: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2], bool))
        y = nn.MultiHeadDotProductAttention(self.heads, dropout_rate=self.dropout,
                                            deterministic=not train)(nn.LayerNorm()(x), mask=causal)
        x = x + y
        y = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
        y = nn.Dense(self.width)(nn.gelu(y))
        if self.dropout:
            y = nn.Dropout(self.dropout, deterministic=not train)(y)
        return x + y


class TransformerLM(nn.Module):
    """Pre-LayerNorm decoder-only Transformer with learned positions and an untied output layer."""

    vocab_size: int
    width: int = 128
    depth: int = 4
    heads: int = 4
    max_len: int = 512
    dropout: float = 0.0

    @nn.compact
    def __call__(self, tokens, train: bool = False, *, mask=None):
        del mask
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={self.max_len}")
        x = nn.Embed(self.vocab_size, self.width)(tokens)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.width))
        x = x + pos[:tokens.shape[1]]
        for _ in range(self.depth):
            x = DecoderBlock(self.width, self.heads, self.dropout)(x, train)
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))
