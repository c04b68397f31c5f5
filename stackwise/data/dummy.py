"""The dummy data: a synthetic, learnable language generated in memory from `seed` (no files)."""

from __future__ import annotations

import numpy as np
import torch

from stackwise.data.config import DataConfig
from stackwise.errors import ConfigError
from stackwise.utils import generator

# The dummy language: a first-order Markov chain over `dummy_vocab` symbols where every symbol has
# exactly two successors, taken with these probabilities. See `dummy_language` for why.
DUMMY_SUCCESSOR_PROBS = (0.85, 0.15)


def dummy_language(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train (n_train, T), val (n_val, T)) uint16 walks of a synthetic language where depth helps,
    generated from `seed` alone (no files). Symbols are 0..S-1; S is [MASK], S+1 [PAD].

    Sequences are walks of a sparse first-order Markov chain over S = dummy_vocab symbols: the
    "grammar" gives every symbol two successors (a random choice, from `(seed, "dummy", "grammar")`),
    taken with probability 0.85 / 0.15; the first symbol is uniform. Why it suits a layer-wise
    masked-diffusion model:
      - one layer learns it fast (the neighbours of a masked token pin it down), so a 1-layer model
        is far below the uniform guess log(S);
      - with t up to 0.9, masked tokens sit in long masked runs; the best guess then depends on the
        nearest visible tokens several positions away through powers of the transition matrix
        (a forward-backward computation), which one attention layer with few heads cannot do but a
        stack can approximate one hop per layer: each layer refines the masked positions' beliefs
        from their neighbours' beliefs, which is also what greedy layer-wise training builds.
    Validation rows never occur in the training rows (rows of val found in train are redrawn).
    """
    S, T = cfg.dummy_vocab, cfg.seq_len
    g = generator(seed, "dummy", "grammar", S)
    successors = dummy_grammar(S, g)  # (S, 2)
    train = _dummy_walks(successors, cfg.n_train, T, generator(seed, "dummy", "train", S, T))
    val = _dummy_val(successors, cfg.n_val, T, generator(seed, "dummy", "val", S, T), train)
    return train, val


def dummy_grammar(S: int, g: torch.Generator) -> torch.Tensor:
    """(S, 2): each symbol's likely and rare successor.

    The likely successors form ONE cycle through all S symbols (a random cyclic order), so a walk
    never gets stuck in a self-loop or a short cycle; the rare successor is any other symbol that
    is neither the symbol itself nor its likely successor.
    """
    order = torch.randperm(S, generator=g)
    likely = torch.empty(S, dtype=torch.long)
    likely[order] = order.roll(-1)  # order[i] -> order[i + 1]
    rare = torch.randint(0, max(S - 2, 1), (S,), generator=g)  # an index among the S - 2 others
    for s in range(S):  # skip s and likely[s] when counting (S is small: a Python loop is fine)
        for taken in sorted((s, int(likely[s]))):
            rare[s] += int(rare[s] >= taken)
    if S == 2:  # no third symbol: the rare move stays put
        rare = torch.arange(2)
    return torch.stack([likely, rare], 1)


def _dummy_walks(successors: torch.Tensor, n: int, T: int, g: torch.Generator) -> np.ndarray:
    S = successors.shape[0]
    x = torch.empty(n, T, dtype=torch.long)  # (n, T)
    x[:, 0] = torch.randint(0, S, (n,), generator=g)
    # branch 1 (the rarer successor) where u lands in the last 0.15 of [0, 1)
    branch = (torch.rand(n, T, generator=g) >= DUMMY_SUCCESSOR_PROBS[0]).long()  # (n, T)
    for i in range(1, T):
        x[:, i] = successors[x[:, i - 1], branch[:, i]]
    return x.numpy().astype(np.uint16)


def _dummy_val(successors: torch.Tensor, n: int, T: int, g: torch.Generator, train: np.ndarray) -> np.ndarray:
    seen = {row.tobytes() for row in train}
    rows: list[np.ndarray] = []
    for _ in range(16):  # a few rounds always suffice unless seq_len is tiny
        for row in _dummy_walks(successors, n, T, g):
            key = row.tobytes()
            if key not in seen:
                seen.add(key)
                rows.append(row)
        if len(rows) >= n:
            return np.stack(rows[:n])
    raise ConfigError(
        "data.seq_len",
        f"seq_len={T} is too short to draw {n} validation sequences that differ from "
        "the training ones; raise data.seq_len or lower data.n_val / data.n_train",
    )
