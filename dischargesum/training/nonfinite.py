"""Stop training on a non-finite loss or gradient norm and keep the last finite state.

Why: HF's Trainer drops NaN/inf losses from the logged average (``logging_nan_inf_filter``, on by default) and keeps
stepping, so a diverged run (``--learning_rate`` far too high) trained NaN for every step, ended "complete" and
wrote an all-NaN adapter.

How (:class:`NonFiniteGuard`, a ``TrainerCallback``; nothing private of the Trainer is overridden):

* :class:`~dischargesum.training.trainer.DischargeSFTTrainer` ORs a device flag per micro-batch when the loss is
  not finite (no host sync there); the guard wraps the accelerator's public ``clip_grad_norm_``, which HF calls at
  every optimizer step (clipping or not), to see the step's pre-clip gradient norm.
* ``on_pre_optimizer_step``: one host read and, with several processes, one all-reduce (MAX) decide whether the
  step is bad. A bad step's gradients are dropped (``p.grad = None``), so ``optimizer.step()`` leaves the weights
  and the optimizer moments as they were (torch and bitsandbytes optimizers skip parameters without a gradient).
  Under DeepSpeed the engine owns the gradients: the update cannot be skipped there, only the run stopped.
* ``on_step_end``: a bad step never saves or evaluates; more than ``nonfinite_patience`` bad steps in a row stop
  training. The trainable weights are checked finite before every checkpoint save and at the stop. At the stop the
  current state — the one after the last finite update, since the bad updates were skipped — is committed as a
  checkpoint when its weights are finite; otherwise nothing is saved and the newest committed checkpoint (each one
  checked finite when it was saved) is the last good one. ``sft_qlora`` then exits with
  :data:`dischargesum.cli.EXIT_NONFINITE` (3) and a message naming ``learning_rate`` and ``max_grad_norm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

from dischargesum.logging_utils import get_logger

logger = get_logger(__name__)


def _any_rank(flags: list[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over all processes (all-reduce MAX); the local flags without a process group.

    Collective: every rank calls it at the same trainer event. (Not preemption's ``agree_across_ranks``: that one
    also records a preemption.)
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return flags
    use_cuda = "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    tensor = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def _is_finite(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


@dataclass
class NonFiniteStop:
    """Why and where training stopped."""

    step: int
    cause: str  # "loss", "gradient norm", "loss and gradient norm" or "weights"
    bad_steps_in_a_row: int
    last_finite_update_step: int
    committed: bool  # the state at ``step`` (weights of the last finite update) was committed as a checkpoint

    def message(self, *, learning_rate: float, max_grad_norm: float, patience: int, output_dir: str) -> str:
        if self.cause == "weights":
            what = f"the trainable weights became non-finite after step {self.step}'s update"
        else:
            what = (
                f"non-finite {self.cause} for {self.bad_steps_in_a_row} optimizer step(s) in a row "
                f"(nonfinite_patience {patience}; their updates were skipped)"
            )
        if self.committed:
            kept = (
                f"checkpoint-{self.step} in {output_dir} holds the state after the last finite update (step "
                f"{self.last_finite_update_step}) and is committed"
            )
        else:
            kept = (
                f"nothing was saved at the stop (the weights were not finite): the newest committed checkpoint in "
                f"{output_dir}, if any, is the last finite one"
            )
        return (
            f"sft_qlora: training stopped at step {self.step}: {what}; {kept}. The run diverged: lower "
            f"`learning_rate` (now {learning_rate:g}) and/or set or lower `max_grad_norm` (now {max_grad_norm:g}; 0 "
            "disables clipping), then resume (`--resume_from_checkpoint auto`) or start a fresh `output_dir`; "
            "`nonfinite_patience` skips that many bad steps in a row before stopping."
        )


class NonFiniteGuard(TrainerCallback):
    """See the module docstring. ``trainer`` is the DischargeSFTTrainer it watches."""

    def __init__(self, trainer: Any, patience: int) -> None:
        self.trainer = trainer
        self.patience = patience
        self.streak = 0
        self.last_finite_update_step = 0
        self.stopped: NonFiniteStop | None = None
        self._step_cause: str | None = None
        self._grad_norm: Any = None
        self._wrapped = False

    # ---- hooks ------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.last_finite_update_step = state.global_step
        if not self._wrapped:
            accelerator = self.trainer.accelerator
            clip = accelerator.clip_grad_norm_

            def clip_and_record(*a: Any, **k: Any) -> Any:
                norm = clip(*a, **k)
                self._grad_norm = norm
                return norm

            accelerator.clip_grad_norm_ = clip_and_record
            self._wrapped = True
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        loss_flag = self.trainer.pop_nonfinite_loss()
        loss_bad = bool(loss_flag) if loss_flag is not None else False
        norm_bad = not _is_finite(self._grad_norm)
        self._grad_norm = None
        loss_bad, norm_bad = _any_rank([loss_bad, norm_bad])
        if not (loss_bad or norm_bad):
            self._step_cause = None
            return control
        self._step_cause = " and ".join(name for name, bad in (("loss", loss_bad), ("gradient norm", norm_bad)) if bad)
        if not getattr(self.trainer, "is_deepspeed_enabled", False):
            for param in self.trainer.model.parameters():
                if param.requires_grad:
                    param.grad = None  # the optimizer skips the update: weights and moments stay finite
        return control

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        cause, self._step_cause = self._step_cause, None
        if cause is not None:
            self.streak += 1
            control.should_save = False
            control.should_evaluate = False
            logger.warning(
                "step %d: non-finite %s; update skipped (%d bad step(s) in a row, nonfinite_patience %d)",
                state.global_step,
                cause,
                self.streak,
                self.patience,
            )
            if self.streak > self.patience:
                self._stop(state, control, cause)
            return control
        self.streak = 0
        if control.should_save and not self.weights_finite():  # never commit a diverged state
            self._stop(state, control, "weights")
            return control
        self.last_finite_update_step = state.global_step
        return control

    # ---- helpers ----------------------------------------------------------------------------------------------

    def weights_finite(self) -> bool:
        """Whether every trainable parameter is finite on every rank (collective)."""
        params = [p.detach() for p in self.trainer.model.parameters() if p.requires_grad and p.numel()]
        local = bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True
        return not _any_rank([not local])[0]

    def _stop(self, state: Any, control: Any, cause: str) -> None:
        committed = cause != "weights" and self.weights_finite()
        self.stopped = NonFiniteStop(
            step=state.global_step,
            cause=cause,
            bad_steps_in_a_row=self.streak,
            last_finite_update_step=self.last_finite_update_step,
            committed=committed,
        )
        control.should_training_stop = True
        control.should_evaluate = False
        control.should_save = committed
