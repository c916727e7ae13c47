"""A quiet console for the app and ``python -m training.jobs``: library noise filtered at the
edge, so what is printed is one line per event that matters."""

from __future__ import annotations

import logging
import warnings


def quiet_library_noise() -> None:
    """What the app and ``python -m training.jobs`` call at start, so that their console has one
    line per event that matters: bitsandbytes' kernel notice
    (:func:`training.models.quiet_optional_kernel_notice`), transformers' weight-loading progress bars, peft's use of transformers' deprecated
    ``is_gradient_checkpointing`` (a FutureWarning on every load), and the INFO lines of HTTP
    clients (one per request) and APScheduler (one per job run) are dropped; their warnings and
    errors still show."""
    import transformers

    from training.models import quiet_optional_kernel_notice

    quiet_optional_kernel_notice()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    for name in ("httpx", "httpcore", "apscheduler"):
        logging.getLogger(name).setLevel(logging.WARNING)
