"""A module in evaluation mode for the length of a block, then back in the mode it was in."""
import contextlib
from typing import Iterator, Optional

from torch import nn


@contextlib.contextmanager
def eval_mode(module: Optional[nn.Module]) -> Iterator[None]:
    """`module.eval()` inside the block, its own mode restored after it (None: nothing to switch)."""
    if module is None:
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
