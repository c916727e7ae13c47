"""The offline starter model: stages 1–2 (pre-training, SFT) of the ChatGPT recipe, built locally.

* :class:`StarterConfig` — sizes and budgets; ``python -m training.starter --help`` lists them.
* :func:`build_starter` — corpus → tokenizer → pre-training → SFT → ``save_pretrained``.
* :func:`ensure_starter` — the app's first-run hook: reuse ``data_dir/starter`` or (re)build it.

Modules: ``corpus`` (seeded synthetic data), ``tokenizer`` (byte-level BPE + chat template),
``loop`` (packing and the training loop), ``build``, ``eval`` (``python -m training.starter.eval``).
"""

from training.starter.build import StarterConfig, build_starter, ensure_starter

__all__ = ["StarterConfig", "build_starter", "ensure_starter"]
