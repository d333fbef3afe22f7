"""Codes and per-row statistics shared by the Triton and torch backends (no triton import here).

The forward of every backend returns ``stats``, a float32 ``(N, NUM_STATS)`` tensor: the few numbers
per row that the backward needs (and that the vocabulary-parallel path, ``vocab_parallel.py``, all-reduces between
passes). Columns:

- ``MAX_Z``, ``LOGS_Z``, ``MAX_T``, ``LOGS_T``: the row maximum of the raw logits and the
  log of ``sum exp((x - max) / T)``, kept apart so that ``log p = (x - max) / T - log s`` stays exact at any
  logit magnitude (an absolute float32 log-sum-exp of logits near 1e4 has lost the digits that matter)
- ``MASS_P``, ``MASS_Q``: ``P = sum_m p``, ``Q = sum_m q`` (1 when nothing is masked)
- ``FKL``, ``RKL``: the row's forward and reverse KL (when the divergence needs them)
- ``TODI_S``: ToDi's ``S_a - S_b``
- ``Q_G``: ``sum_m q g`` of the baselines (sfkl, srkl, jsd, tvd), ``g = dL/dq``: their gradient w.r.t. ``z_j`` is
  ``q_j (g_j - Q_G) / T`` (SPEC §2b)
- ``R_HEAD``, ``R_TAIL``: AKL weights
- ``MAX_CE``, ``LOGS_CE``, ``CE``: the same split for the raw ``z`` (temperature 1) and the cross-entropy, for
  the hard-label term
"""

DIVERGENCE_CODES = {"fkl": 0, "rkl": 1, "akl": 2, "todi": 3, "sfkl": 4, "srkl": 5, "jsd": 6, "tvd": 7}

(MAX_Z, LOGS_Z, MAX_T, LOGS_T, MAX_CE, LOGS_CE, MASS_P, MASS_Q, FKL, RKL, TODI_S, R_HEAD, R_TAIL, CE, Q_G) = range(15)
NUM_STATS = 15
