"""The commands' own output only (``fastpeft demo``, ``fastpeft bench``): the progress bars and notices of the
libraries they drive are not theirs to print; errors still show."""

from __future__ import annotations

import importlib.util
import logging
import warnings


def quiet_third_party_output() -> None:
    """Silence transformers' progress bars and notices, bitsandbytes' note about an optional CPU kernel package
    (logged when it is imported, so call this first) and PEFT's use of an attribute transformers 5 deprecates."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
