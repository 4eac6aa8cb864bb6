"""Runtime modules that rewritten graphs call. Each imports torch only and declares its own cost."""

from .lstm import LSTM, KeepSet

__all__ = ["LSTM", "KeepSet"]
