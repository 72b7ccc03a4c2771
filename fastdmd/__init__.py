"""fastdmd: few-step generators by Distribution Matching Distillation, plus reward-driven RL."""

__version__ = "0.1.0"
