"""The checkpoint store's Trainer integration: the staging save, resume checks, preemption, FSDP adapter I/O.

:class:`CheckpointingTrainerMixin` makes ``Trainer._save_checkpoint`` write through the commit protocol of
:mod:`dischargesum.training.checkpoint_store`: every rank writes into ``.staging-checkpoint-<step>`` with HF's own
writers (adapter/model, optimizer, scheduler, scaler, per-rank RNG states, trainer state — so DeepSpeed and FSDP keep
saving collectively); after a barrier the committing process commits it (fsync, hash, manifest last, rename); a final
barrier releases the ranks. Only that process renames, so there is no race. Its callbacks
(:func:`make_checkpoint_callbacks`) carry the run's facts into the manifest and rotate after each commit.

* **Preemption** (:class:`PreemptionCallback`, :mod:`dischargesum.training.preemption`): SIGTERM / SIGUSR1 set a
  flag; at the next micro-batch, step end or prediction step of an evaluation the ranks agree (all-reduce MAX),
  commit a full checkpoint and stop; the entry point exits with :data:`PREEMPTED_EXIT_CODE` (143). Between
  micro-batches the partial accumulation is dropped and the last completed step is saved (with the RNG state it
  left), so the stop does not wait for a long optimizer step. A signal that lands during a save is seen right
  after the commit (``on_save``): that checkpoint is the one to resume from, nothing more is trained or saved.
* **Exact resume**: weights, optimizer, scheduler, per-rank RNG and data position continue exactly; nothing runs
  between a preemption checkpoint and the exit (no epoch-end evaluation, no second save) and a resume at or past
  ``max_steps`` trains nothing (HF would train one extra step), so a resumed run equals an uninterrupted one.
* **FSDP adapters** (:func:`gather_fsdp_adapter`, :func:`save_fsdp_adapter`, :func:`load_fsdp_adapter`): the LoRA
  tensors of a nested-FSDP PEFT model, which PEFT's own save and load drop.

Test-only crash and pause points (``DISCHARGESUM_FAULT_*``) come from :mod:`dischargesum.training.fault_injection`
and are inert unless those variables are set.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_callback import TrainerCallback

from dischargesum.cli import UserError
from dischargesum.logging_utils import get_logger
from dischargesum.training.checkpoint_store import (
    CHECKPOINT_PREFIX,
    STAGING_PREFIX,
    TRAINER_STATE_NAME,
    CheckpointError,
    RunFacts,
    commit_checkpoint,
    find_latest_valid_checkpoint,
    rotate_checkpoints,
)
from dischargesum.training.fault_injection import SaveFaultInjector, evaluation_pause_callback, save_fault_injector
from dischargesum.training.preemption import (
    PREEMPTED_EXIT_CODE,
    agree_across_ranks,
    install_preemption_handlers,
    preemption_requested,
    preemption_signal_name,
)

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "CheckpointRotationCallback",
    "CheckpointingTrainerMixin",
    "PreemptionCallback",
    "gather_fsdp_adapter",
    "load_fsdp_adapter",
    "make_checkpoint_callbacks",
    "save_fsdp_adapter",
]

logger = get_logger(__name__)


class PreemptedDuringEvaluation(Exception):
    """Raised out of an evaluation loop when the ranks agreed to stop; the mixin turns it into save + stop."""


class CheckpointRotationCallback(TrainerCallback):
    """Holds the run's facts for the manifest; rotates checkpoints after each commit (committing process only)."""

    def __init__(self, facts: RunFacts, output_dir: str | Path, save_total_limit: int | None) -> None:
        self.facts = facts
        self.output_dir = Path(output_dir)
        self.save_total_limit = save_total_limit
        self._pending_fault: SaveFaultInjector | None = None

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if args.should_save:
            protect = [state.best_model_checkpoint] if state.best_model_checkpoint else []
            fault, self._pending_fault = self._pending_fault, None
            on_event = fault.event if fault is not None else None
            rotate_checkpoints(args.output_dir, self.save_total_limit, protect=protect, on_event=on_event)
        return control


def capture_rng_state() -> dict[str, Any]:
    """The generator states HF's ``_save_rng_state`` records (python, numpy, torch CPU, every CUDA device)."""
    import random

    import numpy as np
    import torch

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_state(states: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class PreemptionCallback(TrainerCallback):
    """Installs the signal handlers and agrees on the preemption flag across ranks at every micro-batch, step end
    and prediction step; on agreement asks the trainer to commit a full checkpoint and stop.

    Mid-step (between two micro-batches of a gradient-accumulation step) the partial accumulation is dropped and
    the checkpoint is the state after the last *completed* step — weights, optimizer, scheduler and data position
    are untouched until the optimizer step, and the RNG state is the one captured when the dropped step began — so
    the rerun redoes that step exactly. Why: a step of the MedGemma recipe (4 x 8 x 2048 tokens) takes longer than
    a spot VM's warning; waiting for its end could miss the 30 s before SIGKILL. Not done under DeepSpeed (its
    engine tracks micro-steps itself), before the first step, or in the first step of an epoch (a resume there
    re-draws the epoch's shuffle seed after restoring the RNG): those wait for the step end.
    """

    def __init__(self) -> None:
        self.stopped_at_step: int | None = None
        self.stopped_mid_step = False
        self.saved_after_stop = False
        self.allow_mid_step = True  # the mixin turns it off under DeepSpeed
        self.rng_at_step_begin: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        install_preemption_handlers()
        return control

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.allow_mid_step and args.gradient_accumulation_steps > 1:
            self.rng_at_step_begin = capture_rng_state()
        return control

    def on_substep_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # Every rank evaluates the same condition from the same state, so the collective below stays matched.
        at_epoch_start = state.epoch is not None and float(state.epoch).is_integer()
        if not self.allow_mid_step or state.global_step == 0 or at_epoch_start or self.stopped_at_step is not None:
            return control
        if agree_across_ranks(preemption_requested()):
            self._stop(state, control, mid_step=True)
        return control

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.stopped_at_step is None and agree_across_ranks(preemption_requested()):
            self._stop(state, control, mid_step=False)
        return control

    def _stop(self, state: Any, control: Any, *, mid_step: bool, where: str = "") -> None:
        if not where:
            where = (
                f"during step {state.global_step + 1} (partial accumulation dropped)" if mid_step else "at step end"
            )
        logger.warning(
            "preemption (%s) agreed across ranks at step %d, %s: committing a checkpoint, then stopping",
            preemption_signal_name() or "signal on another rank",
            state.global_step,
            where,
        )
        self.stopped_at_step = state.global_step
        self.stopped_mid_step = mid_step
        control.should_save = True
        control.should_evaluate = False
        control.should_log = False
        control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.stopped_at_step is not None:
            self.saved_after_stop = True
        elif agree_across_ranks(preemption_requested()):
            # The signal landed while this checkpoint was being written (every rank calls on_save after the
            # commit): it is the state to resume from, so stop now instead of training on to save another.
            self._stop(state, control, mid_step=False, where="while its checkpoint was being written")
            control.should_save = False
            self.saved_after_stop = True
        return control

    def on_prediction_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if agree_across_ranks(preemption_requested()):
            raise PreemptedDuringEvaluation
        return control

    def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # After a preemption nothing may run before the checkpoint and the exit: no evaluation (time, and it draws
        # from the RNG), no second save; a mid-step stop saves here (the loop broke before any step-end save).
        if self.stopped_at_step is not None:
            control.should_evaluate = False
            control.should_log = False
            control.should_save = not self.saved_after_stop
        return control


def make_checkpoint_callbacks(
    facts: RunFacts, output_dir: str | Path, save_total_limit: int | None
) -> list[TrainerCallback]:
    """The callbacks a :class:`CheckpointingTrainerMixin` trainer needs: manifest facts + rotation, preemption.

    With ``DISCHARGESUM_FAULT_PAUSE=evaluate`` (tests only) a pause callback goes just before the preemption one, so
    the first prediction step pauses and then agrees on the signal that landed in the pause.
    """
    pause = evaluation_pause_callback()
    return [
        CheckpointRotationCallback(facts, output_dir, save_total_limit),
        *([pause] if pause is not None else []),
        PreemptionCallback(),
    ]


class CheckpointingTrainerMixin:
    """Mix in before the trainer class: ``class T(CheckpointingTrainerMixin, SFTTrainer)``.

    Replaces ``Trainer._save_checkpoint`` with the staging -> fsync -> manifest -> rename protocol (HF's own
    writers do the writing, so every distributed backend keeps working), checks that all ranks resume from the
    same checkpoint, and turns a preemption agreed inside an evaluation loop into save + stop. Needs the callbacks
    from :func:`make_checkpoint_callbacks`.
    """

    # Provided by transformers.Trainer, which this mixin is always combined with (declared for type checkers).
    args: Any
    state: Any
    control: Any
    accelerator: Any
    callback_handler: Any
    hp_search_backend: Any

    # Set by _save_checkpoint: what the last commit wrote (step, bytes, seconds) — read by benchmarks and logs.
    last_checkpoint_info: dict[str, Any] | None = None

    def _checkpointing_callback(self) -> CheckpointRotationCallback:
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, CheckpointRotationCallback):
                return cb
        raise RuntimeError(
            "CheckpointingTrainerMixin needs the callbacks from make_checkpoint_callbacks(facts, output_dir, "
            "save_total_limit) in the trainer's `callbacks`."
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """HF's ``train`` after checking that every rank resumes from the same checkpoint (``True``: the newest
        valid one in ``output_dir``).

        Raises:
            CheckpointError: ``True`` but no valid checkpoint, or the ranks chose different checkpoints.
            ValueError: ``metric_for_best_model`` is set (a preemption inside an evaluation leaves no metric to
                compare: HF's ``_determine_best_metric`` would raise KeyError mid-save).
        """
        self._checkpointing_callback()
        if self.args.metric_for_best_model is not None:
            raise ValueError(
                f"CheckpointingTrainerMixin: metric_for_best_model = {self.args.metric_for_best_model!r} is not "
                "supported (an evaluation cut short by preemption has no metrics); leave it None."
            )
        if resume_from_checkpoint is True:
            found = find_latest_valid_checkpoint(self.args.output_dir)
            if found is None:
                raise CheckpointError(f"resume requested but {self.args.output_dir} holds no valid checkpoint")
            resume_from_checkpoint = str(found)
        if resume_from_checkpoint in (False, ""):
            resume_from_checkpoint = None
        if resume_from_checkpoint is not None:
            resume_from_checkpoint = str(resume_from_checkpoint)
        _require_same_on_all_ranks(resume_from_checkpoint)
        preemption = self._preemption_callback()
        if preemption is not None and getattr(self, "is_deepspeed_enabled", False):
            preemption.allow_mid_step = False
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def _preemption_callback(self) -> PreemptionCallback | None:
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, PreemptionCallback):
                return cb
        return None

    # Kept private override: HF's epoch loop (transformers/trainer.py, Trainer._run_epoch, called from
    # _inner_training_loop right after on_epoch_begin) starts with a step before it checks `max_steps`, and no
    # callback event lies between the checkpoint load and that step where a stop would be honoured: a run resumed
    # from a checkpoint at (or past) max_steps would train one extra step and save checkpoint-<max_steps + 1>. Skip
    # the loop instead; the checkpoint's weights and optimizer state are already loaded (on every backend) here.
    # Pinned by tests/integration/test_fault_tolerance.py
    # ::test_rerun_from_a_checkpoint_at_max_steps_says_so_and_does_not_train.
    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            logger.warning(
                "already at step %d, at or past max_steps=%d: nothing to train (raise `--max_steps` to continue)",
                state.global_step,
                state.max_steps,
            )
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)  # type: ignore[misc]

    # Kept private override, a copy of transformers/trainer.py Trainer._save_checkpoint's body (5.25) with the same
    # writers in the same order, because calling super() cannot give the protocol: (1) HF writes straight into
    # `<_get_output_dir(trial)>/checkpoint-<step>` (no argument or hook names another directory), so a kill mid-save
    # leaves a checkpoint-named directory — we need the staging directory, a barrier, then commit_checkpoint's
    # fsync + manifest + rename on one process, and a final barrier; (2) a mid-step preemption must restore the RNG
    # captured at step begin between the optimizer save and _save_rng_state; (3) HF's own rotation (mtime-based, may
    # keep a broken checkpoint) is replaced by ours (CheckpointRotationCallback, after the commit); (4) the
    # kill-mid-save tests crash after each writer (fault_injection, inert unless its variables are set). Pinned by
    # tests/unit/test_trainer_upstream.py (upstream still calls exactly these writers, in this order) and
    # tests/integration/test_fault_tolerance.py
    # ::test_crash_at_every_point_of_a_save_resumes_from_previous_valid_checkpoint.
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        from transformers.trainer_callback import ExportableState
        from transformers.trainer_utils import SaveStrategy

        cb = self._checkpointing_callback()
        args, state, accelerator = self.args, self.state, self.accelerator
        step = state.global_step
        run_dir = Path(self._get_output_dir(trial=trial))  # type: ignore[attr-defined]
        final_dir = run_dir / f"{CHECKPOINT_PREFIX}-{step}"
        staging = run_dir / f"{STAGING_PREFIX}{step}"
        # One process renames: the global main process, or each node's main with `save_on_each_node` (a
        # filesystem per node, where HF's should_save is true on every local main).
        commits = bool(args.should_save)
        fault = save_fault_injector(step) if commits else None
        t0 = time.perf_counter()
        if commits:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()

        if self.hp_search_backend is None and trial is None:
            self.store_flos()  # type: ignore[attr-defined]
        self.save_model(str(staging), _internal_call=True)  # type: ignore[attr-defined]
        if fault is not None:
            fault.files_appeared(staging)
        saves_best = args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if saves_best and state.best_global_step:
            best_dir = run_dir / f"{CHECKPOINT_PREFIX}-{state.best_global_step}"
            if state.best_global_step == step or best_dir.exists():
                state.best_model_checkpoint = str(best_dir)
        if not args.save_only_model:
            self._save_optimizer_and_scheduler(str(staging))  # type: ignore[attr-defined]
            if fault is not None:
                fault.files_appeared(staging)
            self._save_scaler(str(staging))  # type: ignore[attr-defined]
            preemption = self._preemption_callback()
            # A mid-step preemption checkpoints the last completed step: record the RNG as that step left it (the
            # process exits after this save, so overwriting the live generators is harmless).
            if (
                preemption is not None
                and preemption.stopped_mid_step
                and not preemption.saved_after_stop
                and preemption.rng_at_step_begin is not None
            ):
                restore_rng_state(preemption.rng_at_step_begin)
            self._save_rng_state(str(staging))  # type: ignore[attr-defined]
            if fault is not None:
                fault.files_appeared(staging)
        if args.should_save:
            # As HF: record ExportableState callbacks and the TrainerControl in the trainer state.
            for exportable in [
                c for c in [*self.callback_handler.callbacks, self.control] if isinstance(c, ExportableState)
            ]:
                name = exportable.__class__.__name__
                if isinstance(state.stateful_callbacks.get(name), list):
                    state.stateful_callbacks[name].append(exportable.state())
                else:
                    state.stateful_callbacks[name] = exportable.state()
            state.save_to_json(str(staging / TRAINER_STATE_NAME))
            if fault is not None:
                fault.files_appeared(staging)
        write_seconds = time.perf_counter() - t0
        # Every rank has finished writing its part (DeepSpeed/FSDP shards, rng_state_<rank>.pth) past this barrier.
        accelerator.wait_for_everyone()
        if commits:
            manifest = commit_checkpoint(
                staging,
                final_dir,
                step=step,
                facts=cb.facts,
                world_size=int(args.world_size),
                resumable=not args.save_only_model,
                extra={
                    "distributed_type": str(accelerator.distributed_type),
                    "write_seconds": round(write_seconds, 2),
                },
                on_event=fault.event if fault is not None else None,
            )
            cb._pending_fault = fault
            self.last_checkpoint_info = {
                "step": step,
                "path": str(final_dir),
                "total_bytes": manifest["total_bytes"],
                "write_seconds": round(write_seconds, 3),
                "commit_seconds": manifest["commit_seconds"],
                "save_seconds": round(time.perf_counter() - t0, 3),
            }
            logger.info(
                "committed %s (%.1f MB in %.2f s)", final_dir, manifest["total_bytes"] / 1e6, time.perf_counter() - t0
            )
        # Nobody proceeds (or reads the checkpoint) before the rename is done.
        accelerator.wait_for_everyone()
        if args.push_to_hub:
            self._push_from_checkpoint(str(final_dir))  # type: ignore[attr-defined]

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """HF's ``evaluate``; a preemption agreed inside it commits a checkpoint, stops training and returns ``{}``.

        The empty metrics reach ``Trainer._determine_best_metric``, which reads them only with
        ``metric_for_best_model`` — refused by :meth:`train`.
        """
        try:
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]
        except PreemptedDuringEvaluation:
            if not getattr(self, "is_in_train", False):
                logger.warning("preempted during evaluation outside training: evaluation abandoned")
                return {}
            logger.warning(
                "preempted during evaluation at step %d: committing a checkpoint, then stopping",
                self.state.global_step,
            )
            preemption = self._preemption_callback()
            if preemption is not None:  # before on_save, which would otherwise take this for a new preemption
                preemption.stopped_at_step = self.state.global_step
            self._save_checkpoint(getattr(self, "model_wrapped", None), trial=None)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
            # Already saved; HF must neither save this step again nor re-run the evaluation at the epoch end (that
            # would advance the RNG past the state the checkpoint holds).
            self.control.should_save = False
            self.control.should_evaluate = False
            self.control.should_training_stop = True
            if preemption is not None:
                preemption.saved_after_stop = True
            return {}


def _require_same_on_all_ranks(resume: str | None) -> None:
    """Every rank must resume from the same checkpoint (each resolves it independently from the filesystem).

    Raises:
        CheckpointError: the ranks disagree (e.g. a node sees a different filesystem state).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, resume)
    if len(set(gathered)) > 1:
        raise CheckpointError(
            f"ranks chose different checkpoints to resume from: {gathered}. Is `output_dir` on a filesystem every "
            "node sees? Pass an explicit `--resume_from_checkpoint PATH`."
        )


# ---------------------------------------------------------------------------------------------------------------
# FSDP: the adapter of a nested-FSDP PEFT model (saved by DischargeSFTTrainer.save_model, reloaded on resume)
# ---------------------------------------------------------------------------------------------------------------


def _lora_name(name: str) -> str | None:
    """The PEFT-model name of a LoRA parameter seen through FSDP wrappers (None: not a LoRA parameter)."""
    if "lora_" not in name:
        return None
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _peft_file_key(key: str, adapter: str) -> str:
    """PEFT's adapter-file name of a live LoRA parameter: ``...lora_A.default.weight`` -> ``...lora_A.weight``."""
    return key.replace(f".{adapter}.", ".", 1)


def gather_fsdp_adapter(fsdp_model: Any, peft_model: Any) -> dict[str, torch.Tensor]:
    """Full LoRA tensors of an FSDP-wrapped PEFT model, on the CPU of the main process (empty dict elsewhere).

    Collective (every rank must call it): ``summon_full_params`` unshards each FSDP unit in turn, rank 0 copies the
    LoRA parameters out. Keys are the PEFT model's own names (``...lora_A.default.weight``), what
    ``PeftModel.save_pretrained(state_dict=...)`` expects.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    main = not dist.is_initialized() or dist.get_rank() == 0
    sharded = dist.is_initialized() and dist.get_world_size() > 1  # FSDP refuses CPU offload with one process
    out: dict[str, torch.Tensor] = {}
    with FSDP.summon_full_params(fsdp_model, writeback=False, rank0_only=True, offload_to_cpu=sharded):
        if main:
            for name, param in peft_model.named_parameters():
                key = _lora_name(name)
                if key is not None:
                    out[key] = param.detach().to("cpu", copy=True)
    return out


def save_fsdp_adapter(peft_model: Any, adapter: dict[str, torch.Tensor], output_dir: Path) -> Path:
    """Write ``adapter`` (from :func:`gather_fsdp_adapter`) as PEFT's ``adapter_model.safetensors`` +
    ``adapter_config.json``, loadable by ``PeftModel.from_pretrained``.

    Why not ``PeftModel.save_pretrained(state_dict=...)``: PEFT (0.21) selects the adapter's keys from the model's
    module names and strips only a *leading* ``_fsdp_wrapped_module.``; with FSDP's nested wrapping (every decoder
    layer and LoRA linear is a unit) no name matches and it writes an adapter with 0 tensors — what our FSDP-QLoRA
    checkpoints held on 2 H100s.
    """
    import copy

    from safetensors.torch import save_file

    name = getattr(peft_model, "active_adapter", "default")
    tensors = {_peft_file_key(key, name): t.contiguous() for key, t in adapter.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "adapter_model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[name])
    config.inference_mode = True
    config.save_pretrained(str(output_dir))
    return path


def load_fsdp_adapter(fsdp_model: Any, peft_model: Any, checkpoint: Path) -> int:
    """Copy ``checkpoint/adapter_model.safetensors`` into the LoRA parameters of an FSDP-wrapped PEFT model on every
    rank (collective); returns how many tensors were loaded.

    Raises:
        UserError: no adapter file, an empty one, or a LoRA parameter the file does not have (shape mismatches too).
    """
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    path = checkpoint / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"FSDP checkpoint {checkpoint} has no adapter_model.safetensors to resume the adapter from")
    saved = load_file(str(path), device="cpu")
    if not saved:
        raise UserError(f"{path} holds no tensors: the checkpoint's adapter was not saved; resume from another")
    adapter = getattr(peft_model, "active_adapter", "default")
    loaded = 0
    with torch.no_grad(), FSDP.summon_full_params(fsdp_model, writeback=True, rank0_only=False):
        for name, param in peft_model.named_parameters():
            key = _lora_name(name)
            if key is None:
                continue
            file_key = _peft_file_key(key, adapter)
            tensor = saved.get(file_key)
            if tensor is None or tuple(tensor.shape) != tuple(param.shape):
                raise UserError(
                    f"FSDP resume: {path} has no tensor {file_key} of shape {tuple(param.shape)} "
                    f"(found {None if tensor is None else tuple(tensor.shape)})"
                )
            param.copy_(tensor.to(param.device, param.dtype))
            loaded += 1
    if loaded == 0:
        raise UserError(f"FSDP resume: the model has no LoRA parameters to load {path} into")
    return loaded
