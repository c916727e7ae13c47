"""Named seeds: every seeded part of a round draws its own seed from the round's one seed.

``derive_seed(seed, "ppo/rollout", step)`` hashes the seed, a label and optional indices, so
two parts never share a random stream by accident, a change of ``--seed`` reaches every one of
them, and no part depends on another's arithmetic (``seed * 1_000_003 + step``).
"""

from __future__ import annotations

import hashlib

_BITS = 62  # below 2**63, with room for a row offset (rollouts give row i the seed s + i)


def derive_seed(seed: int, label: str, *index: int) -> int:
    """A seed in ``[0, 2**62)`` for part ``label`` (and ``index``, e.g. the step) of a run
    seeded with ``seed``; the same arguments always give the same seed."""
    text = "/".join([str(int(seed)), label, *(str(int(i)) for i in index)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _BITS)
