"""The two formulas every sampling control uses: the exact KL between whole next-token distributions,
and the log-probs of the mixture w q + (1 - w) p a token was drawn from.

Both are pure, row-wise over the last (vocabulary) axis, and device-agnostic.
"""

from __future__ import annotations

import torch


def kl_exact(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """[...] exact KL(q || p) = sum_v q(v) (log q(v) - log p(v)) from log-distributions [..., V].

    Terms with q(v) = 0 contribute 0 (even where p(v) = 0 too). `logp` may be a semi-distribution
    (mass below 1, e.g. the pessimistic ensemble's pointwise minimum); the formula is the same.
    """
    q = logq.exp()
    gap = logq - logp
    gap.masked_fill_(q == 0, 0.0)  # q(v) = 0: no term, even where log p(v) = -inf (0 * inf)
    return torch.linalg.vecdot(q, gap)  # the products and the sum in one pass


def mixture_logprobs(logq: torch.Tensor, logp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """log(w q + (1 - w) p), computed stably in log space, in `logq`'s dtype.

    Whole distributions: logq, logp [..., V] and w [...] (one weight per row) or [..., 1].
    Sampled tokens: logq, logp, w all [B, L] (log q(x), log p(x) of each token x and its weight).
    w = 1 gives log q (p gets no weight, hence no gradient through it); w = 0 gives log p (and no
    gradient to q).
    """
    w = w.to(logq.dtype)
    if w.dim() == logq.dim() - 1:
        w = w.unsqueeze(-1)
    log_w = torch.log(w.clamp_min(0))
    log_1w = torch.log((1 - w).clamp_min(0))
    return torch.logaddexp(log_w + logq, log_1w + logp.to(logq.dtype))
