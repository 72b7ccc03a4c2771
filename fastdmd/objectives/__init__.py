"""Training methods (METHODS.md), one module each: dmd2 today. The pieces the RL methods share live
beside it: drift.py (DrPO's drift field), schedules.py (DMDR's renoise and guidance schedules),
weights.py (GDMD's reward weights); group statistics and the DMD target are fused ops (fastdmd.ops)."""
