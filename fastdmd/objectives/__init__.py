"""Training methods, one module each, over the shared roles, rollout and ops (METHODS.md).

    dmd2   fastdmd/objectives/dmd2.py   the baseline; its DMD loss is what the others reuse
    dmdr   dmdr.py   DMD as the regularizer of reward backprop; distribution guidance; renoise
    gdmd   gdmd.py   rewards score the DMD targets and weight them (GDMD-like, our reading)
    gndm   gndm.py   group-normalized distribution matching (R_dm-inspired, our reading)
    gndmr  gndm.py   + group advantages of R_dm and rewards, importance-sampled policy gradient
    rtdmd  rtdmd.py  AC-DMD, then hybrid GRPO + last-step reward backprop with SubGRPO
    drpo   drpo.py   ranked dipole drift plus base drift, no reward gradient, no critic
"""

from fastdmd.objectives.base import Batch, Objective, Roles, Update
from fastdmd.objectives.dmd2 import DMD2
from fastdmd.objectives.dmdr import DMDR
from fastdmd.objectives.drpo import DrPO
from fastdmd.objectives.gdmd import GDMD
from fastdmd.objectives.gndm import GNDM
from fastdmd.objectives.rtdmd import RTDMD

OBJECTIVES = {"dmd2": DMD2, "dmdr": DMDR, "gdmd": GDMD, "gndm": GNDM, "gndmr": GNDM, "rtdmd": RTDMD, "drpo": DrPO}


def build_objective(cfg, roles: Roles) -> Objective:
    return OBJECTIVES[cfg.method](cfg, roles)


__all__ = ["Batch", "OBJECTIVES", "Objective", "Roles", "Update", "build_objective"]
