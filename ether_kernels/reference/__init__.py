"""Pure-PyTorch references: the readable specification of every op and the test oracle."""

from .ether_loss import ether_loss_reference
from .mse_loss import mse_loss_reference

__all__ = ["ether_loss_reference", "mse_loss_reference"]
