"""MasterAdamW: the optimizer of perf.master_weights.

The generator and the critic compute on bf16 copies of their fp32 weights (trainer.bf16_copy). This
optimizer holds the fp32 weights ("masters") as its parameters, reads each copy's bf16 gradient, and
in one fused update (fastdmd.ops.master_adamw_: Triton on CUDA, the PyTorch reference on CPU)
applies AdamW to the masters, writes the new weights into the copies and, when given, moves the
generator's EMA. The gradients are never cast to fp32 tensors, the copies never refilled by a
separate pass: see fastdmd/ops/master_adamw_triton.py for the bytes.

Its state dict is torch AdamW's (per parameter: step, exp_avg, exp_avg_sq), so checkpoints written
with or without perf.master_weights resume either way. At beta1 = 0 (DMD2's, fastdmd's default) the
first moment is the gradient itself (torch's AdamW multiplies its old exp_avg by 0), so MasterAdamW keeps
none: 4 B/param less memory, and 4 B/param less written by each update. Its state_dict writes zeros in
its place, all a torch AdamW at beta1 = 0 needs; resumed with beta1 > 0, the first moment starts from zero.
"""

from __future__ import annotations

import torch

from fastdmd import ops


class TorchAdamWState:
    """Mixed into fastdmd's AdamW optimizers (before torch.optim.Optimizer): their state dict is torch AdamW's,
    so that a checkpoint loads into either (DCP loads only the keys the loading side has, and needs them all),
    and a load keeps no exp_avg where beta1 = 0 never reads it."""

    def state_dict(self) -> dict:
        """Optimizer.state_dict's, with torch AdamW's param_group keys (at their defaults where missing: what
        these optimizers do), each parameter's own step count (MasterAdamW's stepped-together states share one,
        which torch's AdamW would add to once per parameter) and zeros for an exp_avg not kept (new tensors,
        this call's only: the optimizer's own states stay as they are)."""
        state_dict = super().state_dict()
        adamw_group = _torch_adamw_defaults()
        for group in state_dict["param_groups"]:
            group.update({key: value for key, value in adamw_group.items() if key not in group})
        for index, state in state_dict["state"].items():
            exp_avg = state["exp_avg"] if "exp_avg" in state else torch.zeros_like(state["exp_avg_sq"])
            state_dict["state"][index] = {"step": state["step"].clone(), "exp_avg": exp_avg,
                                          "exp_avg_sq": state["exp_avg_sq"]}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if group["betas"][0] == 0:
                for p in group["params"]:
                    self.state.get(p, {}).pop("exp_avg", None)


class ApexAdamWState:
    """Mixed into NVIDIA apex's FusedAdam (before it; apex_adamw builds the class). apex counts steps per
    param group (group["step"]), not per parameter, and its zero_grad takes no set_to_none, which the
    trainer and torch.distributed.checkpoint pass. With this its state dict is torch AdamW's (a step per
    parameter, torch AdamW's group keys), so a checkpoint written with apex resumes with torch's AdamW
    (what perf.optimizer apex falls back to where apex is missing) and one written without resumes with
    apex; and zero_grad takes torch's arguments."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        torch.optim.Optimizer.zero_grad(self, set_to_none)

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        adamw_group = _torch_adamw_defaults()
        for group in state_dict["param_groups"]:
            step = float(group.pop("step", 0))
            for key in self.defaults.keys() - adamw_group.keys():  # apex's own (bias_correction): a torch
                group.pop(key, None)  # checkpoint lacks it, and DCP loads only keys the checkpoint has
            group.update({key: value for key, value in adamw_group.items() if key not in group})
            for index in group["params"]:
                if index in state_dict["state"]:  # a new dict: the optimizer's own state stays apex's
                    state_dict["state"][index] = {"step": torch.tensor(step), **state_dict["state"][index]}
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            steps = [float(self.state[p].pop("step")) for p in group["params"] if "step" in self.state.get(p, {})]
            if steps:  # torch AdamW's per-parameter counts: one per group, as apex steps them together
                group["step"] = int(max(steps))
            for key, value in self.defaults.items():  # apex's own keys (bias_correction) where torch's lacked them
                group.setdefault(key, value)


def apex_adamw(fused_adam: type) -> type:
    """apex.optimizers.FusedAdam (given, since apex is imported only where asked for) with torch AdamW's
    state dict and zero_grad (ApexAdamWState)."""
    return type("ApexFusedAdamW", (ApexAdamWState, fused_adam), {})


class MasterAdamW(TorchAdamWState, torch.optim.Optimizer):
    """AdamW (torch's fused AdamW math) on fp32 `params`, whose gradients come from `copies` (same order
    and shapes, bf16; a copy may be rows of a fused weight, see copy_grad): a copy's gradient wins; a
    parameter's own .grad is used when its copy has none (torch.distributed.checkpoint initializes
    optimizer state that way)."""

    def __init__(self, params, copies, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        params = list(params)
        copies = list(copies)
        if len(params) != len(copies) or any(p.shape != c.shape for p, c in zip(params, copies)):
            raise ValueError(f"MasterAdamW needs one bf16 copy per fp32 parameter, same shapes: got {len(params)} "
                             f"parameters and {len(copies)} copies")
        self.copies = {p: c for p, c in zip(params, copies)}
        self._grad_sources: dict[int, tuple] = {}  # per group: where its gradients are read from (_gather_grads)
        self._plans: dict[int, ops.MasterAdamWPlan] = {}  # per group: its fixed tensors, checked once
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._grad_sources.clear()
        self._plans.clear()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # new state tensors: the plans hold the old ones
        self._plans.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for copy in self.copies.values():
            (copy if copy._base is None else copy._base).grad = None

    @staticmethod
    def copy_grad(copy: torch.Tensor) -> torch.Tensor | None:
        """A copy's gradient; for rows of a fused weight (perf.fuse_qkv on the copy: the copy is a view of
        the fused parameter), the same rows of the fused weight's gradient."""
        base = copy._base
        if base is None:
            return copy.grad
        if base.grad is None:
            return None
        offset = copy.storage_offset() - base.storage_offset()
        return base.grad.reshape(-1)[offset:offset + copy.numel()].view(copy.shape)

    def _gather_grads(self, index: int, group: dict) -> list[torch.Tensor] | None:
        """Every parameter's gradient from its copy, as copy_grad reads it, or None when some copy has none.
        Copies that are rows of one fused weight, together all of it, take their gradients from one split
        of its gradient (a view each, in one call) rather than three views each."""
        if index not in self._grad_sources:
            self._grad_sources[index] = self._grad_source_plan(group["params"])
        own, fused, other = self._grad_sources[index]
        grads: list = [None] * len(group["params"])
        for i, copy in own:
            grads[i] = copy.grad
        for base, rows, sizes in fused:
            if base.grad is None:
                return None
            for i, part in zip(rows, base.grad.split_with_sizes(sizes)):
                grads[i] = part
        for i, copy in other:
            grads[i] = self.copy_grad(copy)
        return None if any(g is None for g in grads) else grads

    def _grad_source_plan(self, params: list) -> tuple[list, list, list]:
        """(own: [(index, copy)] of copies with their own .grad, fused: [(fused weight, indices, row counts)]
        of copies that tile a fused weight's rows in order, other: [(index, copy)] of other views)."""
        own, by_base = [], {}
        for i, p in enumerate(params):
            copy = self.copies[p]
            if copy._base is None:
                own.append((i, copy))
            else:
                by_base.setdefault(id(copy._base), (copy._base, []))[1].append((i, copy))
        fused, other = [], []
        for base, members in by_base.values():
            members.sort(key=lambda member: member[1].storage_offset())
            offsets = [copy.storage_offset() - base.storage_offset() for _, copy in members]
            ends = [offset + copy.numel() for offset, (_, copy) in zip(offsets, members)]
            tiles = (base.dim() > 0 and base.is_contiguous() and offsets[0] == 0 and ends[-1] == base.numel()
                     and offsets[1:] == ends[:-1]
                     and all(c.is_contiguous() and c.shape[1:] == base.shape[1:] for _, c in members))
            if tiles:
                fused.append((base, [i for i, _ in members], [c.shape[0] for _, c in members]))
            else:
                other.extend(members)
        return own, fused, other

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None,
             ema: tuple[dict[torch.Tensor, torch.Tensor], float] | None = None,
             skip: torch.Tensor | None = None) -> list[dict]:
        """One update. grad_scale: a one-element fp32 device tensor every gradient is multiplied by (the
        clipping coefficient, applied inside the fused update instead of by a pass over the gradients).
        ema: ({parameter: its EMA tensor}, decay), moved after the update as trainer.EMA.update does (every
        weight, stepped or not), in the same pass for the stepped ones. skip: a one-element device tensor;
        nonzero, the update writes nothing (weights, moments, copies, EMA): the trainer's non-finite loss
        or gradient, decided on the device so that the host does not wait for the GPU. The step counts
        advance all the same: give them back with uncount(the returned states) once the flag is read."""
        if closure is not None:
            raise ValueError("MasterAdamW.step takes no closure")
        self._counted: list[dict] = []
        for index, group in enumerate(self.param_groups):
            if not self._step_whole_group(index, group, grad_scale, ema, skip):
                self._step_some(group, grad_scale, ema, skip)
        return self._counted

    @staticmethod
    def uncount(states: list[dict]) -> None:
        """Take back the step counts a skipped step (see step's skip) advanced: a later update of the same
        optimizer before this (in the same training step) used a count one higher than torch AdamW would."""
        for count in {id(state["step"]): state["step"] for state in states}.values():
            count -= 1

    def _step_whole_group(self, index: int, group: dict, grad_scale, ema, skip) -> bool:
        """The usual step: every parameter has its copy's gradient (one dtype) and a state; at one step
        count, one update of the group's plan. False, with nothing done, otherwise."""
        params = group["params"]
        grads = self._gather_grads(index, group)
        if not params or grads is None or len({g.dtype for g in grads}) != 1:
            return False
        states = [self.state[p] for p in params]
        if not all(states):
            return False
        entries = [(p, g, state, self.copies[p]) for p, g, state in zip(params, grads, states)]
        by_step = self._count_step(entries, every_parameter=True)
        if len(by_step) != 1:  # counts loaded apart
            self._launch(group, by_step, grad_scale, ema, skip)
            return True
        emas = None if ema is None else [ema[0][p] for p in params]
        beta1, beta2 = group["betas"]
        plan = self._plans.get(index)
        if (plan is None or not _same_tensors(plan.masters, params) or not _same_tensors(plan.emas, emas)
                or (plan.exp_avgs is None) != (beta1 == 0)):
            plan = ops.MasterAdamWPlan(params, first_moments(states, beta1), [s["exp_avg_sq"] for s in states],
                                       [self.copies[p] for p in params], emas)
            self._plans[index] = plan
        ops.master_adamw_update_(plan, grads, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                 weight_decay=group["weight_decay"], step=next(iter(by_step)), grad_scale=grad_scale,
                                 ema_weight=0.0 if ema is None else 1.0 - ema[1], skip=skip)
        return True

    def _step_some(self, group: dict, grad_scale, ema, skip) -> None:
        """A step where some parameters have no gradient, no state yet, or their own fp32 gradient (torch's
        DCP initializes state that way)."""
        entries = []
        for p in group["params"]:
            copy = self.copies[p]
            grad = self.copy_grad(copy)
            grad = grad if grad is not None else p.grad
            if grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            entries.append((p, grad, state, copy))
        if ema is not None:
            shadow, decay = ema
            stepped = {id(entry[0]) for entry in entries}
            still = [p for p in group["params"] if id(p) not in stepped]
            if still and (skip is None or not bool(skip.reshape(()))):  # rare: the flag read here
                torch._foreach_lerp_([shadow[p] for p in still], still, 1.0 - decay)
        if entries:
            self._launch(group, self._count_step(entries, every_parameter=len(entries) == len(group["params"])),
                         grad_scale, ema, skip)

    @staticmethod
    def _launch(group: dict, by_step: dict[int, list], grad_scale, ema, skip) -> None:
        """One update per step count and gradient dtype (a parameter's own fp32 gradient goes with fp32 ones)."""
        beta1, beta2 = group["betas"]
        for step, same_step in by_step.items():
            params, grads, states, copies = zip(*same_step)
            emas, ema_weight = None, 0.0
            if ema is not None:
                shadow, decay = ema
                emas, ema_weight = [shadow[p] for p in params], 1.0 - decay
            for dtype in {g.dtype for g in grads}:
                pick = [i for i, g in enumerate(grads) if g.dtype == dtype]
                ops.master_adamw_([params[i] for i in pick], [grads[i] for i in pick],
                                  first_moments([states[i] for i in pick], beta1),
                                  [states[i]["exp_avg_sq"] for i in pick],
                                  [copies[i] for i in pick], lr=group["lr"], beta1=beta1, beta2=beta2,
                                  eps=group["eps"], weight_decay=group["weight_decay"], step=step,
                                  grad_scale=grad_scale, emas=None if emas is None else [emas[i] for i in pick],
                                  ema_weight=ema_weight, skip=skip)

    def _count_step(self, entries: list, every_parameter: bool) -> dict[int, list]:
        """Add one to the stepped parameters' step counts; {step number: their entries}. When every
        parameter steps, their states share one step tensor (torch AdamW's per-parameter 'step'; one host
        add instead of hundreds right after the step's synchronization); states holding separate equal
        counts (new, or loaded from a checkpoint) are joined first. Otherwise each count is its own."""
        states = [state for _, _, state, _ in entries]
        self._counted.extend(states)
        first = states[0]["step"]
        if every_parameter and not all(state["step"] is first for state in states):
            counts = torch.stack([state["step"].cpu() for state in states])  # fused torch AdamW keeps them on the GPU
            if bool((counts == counts[0]).all()):
                first = counts[0].clone()
                for state in states:
                    state["step"] = first
        if every_parameter and all(state["step"] is first for state in states):
            first += 1
            return {int(first): entries}
        by_step: dict[int, list] = {}
        for state, entry in zip(states, entries):
            state["step"] = state["step"].cpu() + 1  # a new tensor: apart from the shared count of the others
            by_step.setdefault(int(state["step"]), []).append(entry)
        return by_step


class NoMomentumAdamW(TorchAdamWState, torch.optim.Optimizer):
    """torch's fused AdamW at beta1 = 0 (DMD2's) keeping no exp_avg: the first moment is the gradient, so
    the gradient tensors serve as torch._fused_adamw_'s exp_avgs (it writes g there, where g is already).
    The same update, bit for bit, as torch.optim.AdamW(fused=True), with 4 B/param less memory; the state
    dict is torch AdamW's (TorchAdamWState). The default AdamW of fastdmd's fp32-weight runs,
    FSDP2's sharded (DTensor) parameters included, at trainer.adam_beta1 0 (accel.make_adamw)."""

    def __init__(self, params, lr: float, betas=(0.0, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        if betas[0] != 0:
            raise ValueError(f"NoMomentumAdamW keeps no first moment: it needs beta1 = 0, got betas {betas!r}; "
                             "use torch.optim.AdamW")
        defaults = _torch_adamw_defaults() | dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("NoMomentumAdamW.step takes no closure")
        for group in self.param_groups:
            if group["betas"][0] != 0:
                raise ValueError(f"NoMomentumAdamW needs beta1 = 0, the group has betas {group['betas']!r}")
            by_device: dict[tuple, tuple[list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # as torch's fused AdamW: a float32 count on the parameter's device
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                lists = by_device.setdefault((p.device, p.dtype), ([], [], [], []))
                for column, tensor in zip(lists, (p, p.grad, state["exp_avg_sq"], state["step"])):
                    column.append(tensor)
            for params, grads, exp_avg_sqs, steps in by_device.values():
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(params, grads, grads, exp_avg_sqs, [], steps, lr=group["lr"], beta1=0.0,
                                    beta2=group["betas"][1], weight_decay=group["weight_decay"], eps=group["eps"],
                                    amsgrad=False, maximize=False)


def _torch_adamw_defaults() -> dict:
    """torch.optim.AdamW's param_group keys and defaults, as this torch has them."""
    return dict(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults)


def first_moments(states: list[dict], beta1: float) -> list[torch.Tensor] | None:
    """The states' exp_avg tensors for an update at beta1; None at beta1 = 0, where none is kept. A state
    without one at beta1 > 0 (its betas changed since) starts from zeros, as torch's AdamW does."""
    if beta1 == 0:
        return None
    for state in states:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(state["exp_avg_sq"])
    return [state["exp_avg"] for state in states]


def _same_tensors(a: list | None, b: list | None) -> bool:
    """The same tensor objects in the same order (never == on tensors: that compares values)."""
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
