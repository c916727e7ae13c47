"""The offline starter model: stages 1–2 (pre-training, SFT) of the ChatGPT recipe, built locally.

Modules: ``corpus`` (seeded synthetic data), ``tokenizer`` (byte-level BPE + chat template),
``build`` (:class:`~training.starter.build.StarterConfig`, ``build_starter``, and
``ensure_starter``, the app's first-run hook), ``tiny`` (random-weight tiny models for tests and
benchmarks) and ``eval`` (``python -m training.starter.eval``). Training itself is
:mod:`training.sft`'s. Build one with ``python -m training.starter --out DIR``.
"""
