"""Token ids against a loaded model's vocabulary: prompt pairs tokenized for a model, and the check that
every id a pass reads is a row of its embedding.

An id past the embedding matrix (a tokenizer with added tokens or a pad token the model was never resized
for) is an IndexError on the CPU; on CUDA it is a device-side assert, after which every CUDA call of the
process fails (in the app: every session's). So ids are checked before any pass.
"""

from __future__ import annotations

from typing import Any

import torch

from eapcore.data import DataError, PromptPairs, TokenizedPairs, tokenize


def tokenize_for(pairs: PromptPairs, model: Any) -> TokenizedPairs:
    """``pairs`` tokenized with ``model``'s tokenizer, checked against its context and its vocabulary."""
    data = tokenize(pairs, model.tokenizer, model.cfg.n_ctx)
    check_vocabulary(data, model)
    return data


def check_vocabulary(data: TokenizedPairs, model: Any) -> None:
    """Every id of the prompts, their padding and the answers is below ``model.cfg.d_vocab``; otherwise a
    :class:`DataError` naming the first bad row, the id, its token and the vocabulary size."""
    d, n = data.data, int(model.cfg.d_vocab)
    if n <= 0:  # a config that leaves the vocabulary to the tokenizer: nothing to check against
        return
    real = torch.arange(d.n_pos)[None, :] < d.lengths[:, None].cpu()
    for what, ids, used in (("clean prompt", d.clean, real), ("corrupted prompt", d.corrupted, real),
                            ("correct answer", d.correct, d.correct_mask), ("incorrect answer", d.incorrect, d.incorrect_mask)):
        bad = ((ids < 0) | (ids >= n)).nonzero().tolist()
        if not bad:
            continue
        row, col = bad[0]
        token_id = int(ids[row, col])
        tokenizer = getattr(model, "tokenizer", None)
        token = f"id {token_id}" + ("" if tokenizer is None else f" ({tokenizer.convert_ids_to_tokens(token_id)!r})")
        where = f"the {what} has token {token}" if used[row, col] else f"the {what} is padded with the tokenizer's pad {token}"
        raise DataError(
            f"row {row + 1}: {where}, outside the model's vocabulary of {n} ids (0 to {n - 1}); the tokenizer does not "
            "match the model: load the tokenizer saved with the model, or resize the model's embeddings to the tokenizer"
        )
