"""
lm_utils.py: the plumbing under pmd_mean.py's algorithm. Nothing here is PMD; read it to change how
log-probs are computed or batched.

  - log-probs through the output layer in chunks (never a (B, T, V) float32 tensor), from rows
    shifted left so that the transformer runs only on real tokens;
  - micro-batches (one forward/backward each, memory only) taken in order of length;
  - the EOS ids of a model, the name of its KV-cache argument, whether it checkpoints activations.

Shapes as in pmd_mean.py: B sequences of T tokens, H hidden size, V vocabulary, N response tokens.
"""

from __future__ import annotations

import inspect

import torch


def micro_batches_by_length(rollouts, size: int, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices of each micro-batch (one forward/backward, memory only), `size` rows each, in
    order of length (real tokens).

    The loss is a sum over rows, so which rows share a micro-batch changes nothing but float
    rounding. But a micro-batch costs as much as its longest row times its rows (`token_logprobs`
    left-aligns the rows and cuts the rest), so grouping short rows with short rows saves compute on
    ragged responses: the update's time then follows the real tokens (`bench.py`, ragged row).
    `rows`: split only these rows (one mini-batch); default all.
    """
    if rows is None:
        rows = torch.arange(rollouts.input_ids.shape[0])                   # (B,)
    n_real = rollouts.attention_mask.sum(-1).cpu()[rows]                   # (b,)
    return list(rows[n_real.argsort(stable=True)].split(size))             # [(≤ size,), ...] shortest first


def gather_logprobs(lm_head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor,
                     entropy: bool = False):
    """log softmax(lm_head(h))[target] for n rows: (n, H), (n,) → (n,), via logit − logsumexp.

    With `entropy`, also the entropy of each row's distribution, (n,), no gradient (a metric).
    """
    logits = lm_head(h).float()                                            # (n, V), float32 for this chunk only
    lse = torch.logsumexp(logits, dim=-1)                                  # (n,)
    # log π(y_j | y_<j) = z_{y_j} − log Σ_v e^{z_v}
    logp = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - lse         # (n,)
    if not entropy:
        return logp
    with torch.no_grad():
        # H = −Σ_v p_v·log p_v = log Σ_v e^{z_v} − Σ_v p_v·z_v   (p = softmax(z))
        ent = lse - (logits.softmax(-1) * logits).sum(-1)                  # (n,)
    return logp, ent


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
    """Shift each row's real tokens to start at column 0 and keep W columns, the most real tokens of
    any row: (B, T) × 3 → ids, real, resp, each (B, W).

    A row's real tokens (its prompt's, then its response's) are contiguous, so the transformer body
    needs only W columns instead of the widest prompt plus the longest response. Nothing changes but
    float rounding: positions come from the mask, a token attends to the same tokens, and the response
    tokens keep their order, so the flat list of their log-probs is the same in both layouts.
    """
    B, T = input_ids.shape
    mask = attention_mask.long()                                           # (B, T)
    n_real = mask.sum(-1)                                                  # (B,)
    lead = mask.argmax(-1)                                                 # (B,) first real column
    last = T - 1 - mask.flip(-1).argmax(-1)                                # (B,) last real column
    if not bool(((last - lead + 1 == n_real) | (n_real == 0)).all()):
        raise ValueError("token_logprobs: a row's attention mask has a hole; real tokens must be contiguous")
    W = int(n_real.max())
    col = torch.arange(W, device=input_ids.device)                         # (W,)
    src = (lead.unsqueeze(1) + col).clamp(max=T - 1)                       # (B, W) source column
    real = col < n_real.unsqueeze(1)                                       # (B, W)
    return input_ids.gather(1, src), real, response_mask.gather(1, src).bool() & real  # (B, W) each


def chunked_logprobs(lm_head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk: int,
                      entropy: bool):
    """`gather_logprobs` over (N, H) hidden states `chunk` rows at a time: (N,) log-probs and (N,)
    entropies (None without `entropy`). With gradients on, each chunk is checkpointed: backward
    recomputes its (chunk, V) logits instead of keeping them all alive."""
    pieces = []
    for s in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(
                gather_logprobs, lm_head, h[s:s + chunk], targets[s:s + chunk], entropy, use_reentrant=False))
        else:
            pieces.append(gather_logprobs(lm_head, h[s:s + chunk], targets[s:s + chunk], entropy))
    cat = lambda xs: torch.cat(xs) if xs else h.new_zeros(0, dtype=torch.float32)  # (N,)
    if not entropy:
        return cat(pieces), None
    return cat([lp for lp, _ in pieces]), cat([ent for _, ent in pieces])


def eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a response (instruct models often have two)."""
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        ids.update(e if isinstance(e, (list, tuple)) else ([] if e is None else [e]))
    if not ids:
        raise ValueError("the tokenizer and model define no EOS token; responses could never end")
    return sorted(ids)


def cache_arg(model) -> str:
    """The name of the forward pass's KV-cache argument: `cache` since transformers 5.2x, before it
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def is_checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new name, old name
        if name in dir(type(model)):
            return bool(getattr(model, name))
    return False
