"""The training step, the only one: the engine, doctor's probe and benchmarks/compare.py all call TrainStep.step.

uint8 micro-batches in; loss, gradients (accumulated, all-reduced under torchrun, unscaled, clipped) and the
update out: AdamW, the LR schedule and the EMA. A step whose loss or gradients are not finite leaves the
weights and the optimizer state as they were, yet counts as a step on every device (the step counter, LR
schedule and EMA move on), so a run counts the same steps wherever it trains. Where AdamW is fused (CUDA,
the CPU) it skips the update itself from a device flag (``found_inf``), so no step waits for the host.

On CUDA (no gradient accumulation, no fp16 loss scaling) forward + backward (+ clip) is captured once as a
CUDA graph and replayed each step: the UNet's hundreds of small kernels then cost one launch instead of
hundreds of Python dispatches, which is what bounds an eager UNet at 32 px (docs/performance.md). Under
torchrun the graph replaces DistributedDataParallel: ``GradSync`` all-reduces the gradients after each replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import diffusion
from .augment import augment
from .diffusion import Schedule
from .errors import DdpmctlError
from .gradsync import GradSync, bind_grads
from .labeled import Batch, batch_images
from .runtime import Precision, capture_cuda_graph, classify_oom
from .state import EMA

GRAPH_WARMUP_STEPS = 3  # eager runs on a side stream before capture (cuDNN autotuning, compilation, lazy state)


def graph_blocker(device: torch.device, precision: Precision, accumulation: int, distributed: bool,
                  checkpointing: bool = False) -> str | None:
    """Why the training step cannot run as a CUDA graph here (None: it can)."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if checkpointing:  # its recomputation saves and restores the RNG state, which capture does not allow
        return "--gradient-checkpointing"
    if precision.use_scaler:
        return "fp16 loss scaling checks gradients on the host"
    if accumulation > 1:
        return "gradient accumulation"
    if distributed:
        return "torchrun with DistributedDataParallel"
    return None


def make_optimizer(params: Any, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused on CUDA and the CPU: one multi-tensor kernel instead of a Python loop over the
    parameters, and the device-side skip of non-finite steps (``found_inf``). MPS keeps PyTorch's
    default implementation."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cuda", "cpu") or None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved optimizer state but keep this run's implementation of it.

    ``Optimizer.load_state_dict`` copies the saved param groups' flags too, so a checkpoint from an
    unfused optimizer (an older ddpmctl on the CPU, any MPS run) would silently unfuse this one, and on
    CUDA the device-side skip (``found_inf``) needs the fused kernel. The step counters then move to
    where this implementation keeps them.
    """
    keep = {k: optimizer.defaults[k] for k in ("fused", "foreach", "capturable", "differentiable")
            if k in optimizer.defaults}
    optimizer.load_state_dict(state)
    on_device = bool(keep.get("fused") or keep.get("capturable"))
    for group in optimizer.param_groups:
        group.update(keep)
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                optimizer.state[p]["step"] = step.to(p.device if on_device else "cpu", torch.float32)


@dataclass
class StepResult:
    """What one optimisation step leaves on the device (reading any of them waits for it)."""

    loss: torch.Tensor  # scalar: mean loss over the step's micro-batches
    grad_norm: torch.Tensor  # scalar: gradient norm before clipping
    skipped: torch.Tensor  # scalar float: 1.0 when the loss or a gradient was not finite and the update was skipped


class TrainStep:
    """One optimisation step: forward, backward, clip and update (optionally as a replayed CUDA graph)."""

    def __init__(
        self,
        model: nn.Module,
        train_model: nn.Module,
        schedule: Schedule,
        precision: Precision,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
        *,
        scaler: torch.amp.GradScaler | None = None,
        ema: EMA | None = None,
        loss_fn: str = "mse",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        random_flip: bool = True,
        augment: float = 0.0,
        class_dropout: float = 0.1,
        channels_last: bool = False,
        accumulation: int = 1,
        max_grad_norm: float = 1.0,
        ddp: DistributedDataParallel | None = None,
        grad_sync: GradSync | None = None,
        cuda_graph: bool = False,
        graph_batch: int | None = None,
        checkpointing: bool = False,
        fixed_shape: bool = False,
    ):
        self.model, self.train_model = model, train_model  # train_model: model wrapped by DDP and/or torch.compile
        self.schedule, self.precision, self.device = schedule, precision, device
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
        self.loss_fn, self.random_flip, self.channels_last = loss_fn, random_flip, channels_last
        self.augment = augment  # probability of each non-leaking augmentation (augment.py); 0: none
        self.class_dropout = class_dropout  # share of class labels replaced by "no class" (classifier-free guidance)
        self.min_snr_gamma = min_snr_gamma if loss_weighting == "min_snr" else None
        self.accumulation = accumulation
        self.max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        self.ddp, self.grad_sync = ddp, grad_sync
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Fused AdamW skips a non-finite update on the device; fp16 loss scaling and MPS decide on the host.
        self.skip_on_device = bool(optimizer.defaults.get("fused")) and not precision.use_scaler
        blocker = graph_blocker(device, precision, accumulation, ddp is not None, checkpointing) if cuda_graph else "off"
        self.graph_wanted = blocker is None and self.skip_on_device
        self.use_graph = self.graph_wanted  # turned off for good if a capture fails
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: torch.Tensor | None = None
        self.static_labels: torch.Tensor | None = None  # the graph's class labels (class-conditional runs)
        self.static_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | torch.Tensor | None = None
        self.graph_note: str | None = None  # set if capture failed (on any rank) and the step fell back to eager
        if checkpointing and cuda_graph and device.type == "cuda":
            self.graph_note = "--gradient-checkpointing: the step runs eagerly, without the CUDA graph (slower per image)"
        self.graph_batch = graph_batch  # images in the captured batch (the configured batch size); None: the first's
        # MPS: a short batch (an epoch's last) is padded to graph_batch images, as the graph pads it, since each
        # new batch shape makes the MPS allocator's driver memory grow (see _fixed_shapes).
        self.fixed_shape = fixed_shape
        self.static_rows: torch.Tensor | None = None
        self._rng: torch.Tensor | None = None  # the CUDA RNG state before the warm-up
        self.graph_grads: list[torch.Tensor | None] = []  # the .grad tensors the captured backward writes
        self.graph_checked = False  # whether every rank's capture outcome has been counted (GradSync)
        self.on_phase: Callable[[], None] | None = None  # called after each forward and backward (doctor's memory probe)

    @property
    def distributed(self) -> bool:
        return self.ddp is not None or self.grad_sync is not None

    # -- eager ------------------------------------------------------------------------------------

    def micro_batch(self, batch: Batch, accumulating: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of one micro-batch, backward included (uint8 -> [-1, 1], flip, noise and target on the device).

        ``batch``: uint8 images, or (images, class labels) for a class-conditional run. ``rows`` (a device
        scalar): only the first ``rows`` images count towards the loss and gradients.
        """
        images = batch_images(batch).to(self.device, non_blocking=True)
        x0 = images.float().div_(127.5).sub_(1.0)
        if self.random_flip:
            flip = torch.rand(x0.shape[0], device=self.device) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        cond: dict[str, torch.Tensor] = {}  # what the network is told besides the noise level
        if self.augment > 0:  # Karras et al. 2022: augment, and say how, so the samples carry none of it
            x0, cond["augment_labels"] = augment(x0, self.augment)
        if isinstance(batch, (tuple, list)):  # Ho & Salimans 2022: drop labels, so the net learns p(x) too
            labels = batch[1].to(self.device, non_blocking=True)
            dropped = torch.rand(labels.shape[0], device=self.device) < self.class_dropout
            cond["class_labels"] = torch.where(dropped, -1, labels)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        inputs, level, target, weight = self._example(x0)
        sync = self.ddp.no_sync() if accumulating and self.ddp is not None else contextlib.nullcontext()
        with sync:  # all-reduce gradients only on the last micro-batch
            with self.precision.autocast():
                pred = self.train_model(inputs, level, **cond)
            if rows is None and weight is None:
                loss = diffusion.loss_fn(pred, target, self.loss_fn)
            else:
                per_image = diffusion.loss_fn(pred, target, self.loss_fn, reduction="none").flatten(1).mean(1)
                if weight is not None:
                    per_image = per_image * weight
                if rows is None:
                    loss = per_image.mean()
                else:  # the graph's fixed-size batch: only the first `rows` images are real (see _capture)
                    real = torch.arange(per_image.shape[0], device=per_image.device) < rows
                    loss = torch.where(real, per_image, 0.0).sum() / rows  # where, not *: a padded NaN must not leak
            if self.on_phase is not None:
                self.on_phase()
            self.scaler.scale(loss / self.accumulation).backward()
            if self.on_phase is not None:
                self.on_phase()
        return loss.detach()

    def _example(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(network input, noise conditioning, target, per-image loss weight or None) for clean images x0."""
        n, sched = x0.shape[0], self.schedule
        if sched.formulation == "edm":  # continuous noise levels, preconditioned (Karras et al. 2022)
            sigma = diffusion.edm_training_sigmas(torch.randn(n, device=self.device))
            inputs, c_noise, target = diffusion.edm_training_example(x0, torch.randn_like(x0), sigma)
            return inputs, c_noise, target, None
        t = torch.randint(0, sched.num_steps, (n,), device=self.device)
        noise = torch.randn_like(x0)
        target = diffusion.training_target(sched, x0, t, noise)
        weight = None if self.min_snr_gamma is None else diffusion.min_snr_weight(sched, t, self.min_snr_gamma)
        return diffusion.q_sample(sched, x0, t, noise), t, target, weight

    def _gradients(self, batches: list[Batch], rows: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward of the step's micro-batches, this rank's gradients only: the step's loss."""
        if self.grad_sync is not None:
            self.grad_sync.zero()
        n = len(batches)
        shaped = self._fixed_shapes(batches, rows)
        losses = [self.micro_batch(b, accumulating=i < n - 1, rows=r) for i, (b, r) in enumerate(shaped)]
        return losses[0] if n == 1 else torch.stack(losses).mean()

    def _fixed_shapes(self, batches: list[Batch], rows: torch.Tensor | None) -> list[tuple[Batch, torch.Tensor | None]]:
        """(micro-batch, rows that count) pairs. With ``fixed_shape``, a batch shorter than ``graph_batch`` gets
        zero images appended that do not count (``rows``), so the device sees one input shape for the whole run."""
        if not self.fixed_shape or rows is not None or not self.graph_batch:
            return [(b, rows) for b in batches]
        shaped = []
        for b in batches:
            images = batch_images(b)
            missing = self.graph_batch - images.shape[0]
            if missing > 0:
                padded: Batch = torch.cat([images, images.new_zeros((missing, *images.shape[1:]))])
                if isinstance(b, (tuple, list)):  # padded rows take "no class" (-1): they count for nothing anyway
                    padded = (padded, torch.cat([b[1], b[1].new_full((missing,), -1)]))
                shaped.append((padded, torch.tensor(float(images.shape[0]), device=self.device)))
            else:
                shaped.append((b, None))
        return shaped

    def _eager(self, batches: list[Batch], rows: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._finish(self._gradients(batches, rows))

    def _finish(self, step_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All-reduce (GradSync), unscale and clip the gradients: (loss, grad_norm, check)."""
        if self.grad_sync is not None:
            self.grad_sync.all_reduce()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        # With loss scaling the scaler finds non-finite gradients itself; otherwise the norm carries them.
        check = step_loss if self.precision.use_scaler else step_loss + grad_norm
        return step_loss, grad_norm, check

    # -- CUDA graph -------------------------------------------------------------------------------

    def _capture(self, batch: Batch) -> None:
        """Warm up on a side stream, then record forward + backward + clip into one CUDA graph.

        With GradSync the graph ends after the backward: the all-reduce and the clip follow each replay.

        The graph holds a fixed batch of ``graph_batch`` images; a shorter batch (an epoch's last) fills
        the first rows and ``static_rows`` says how many count, so every step replays the same graph.
        """
        images = batch_images(batch)
        rows = self.graph_batch or images.shape[0]
        self.static_batch = torch.zeros((rows, *images.shape[1:]), dtype=images.dtype, device=self.device)
        if isinstance(batch, (tuple, list)):  # class labels get their static rows too
            self.static_labels = torch.zeros(rows, dtype=torch.long, device=self.device)
        static: Batch = self.static_batch if self.static_labels is None else (self.static_batch, self.static_labels)
        self.static_rows = torch.zeros((), dtype=torch.float32, device=self.device)
        self._load(batch)
        # The warm-up draws flips, timesteps and noise: put the generator back afterwards, so a resumed run
        # draws what the uninterrupted one drew.
        self._rng = torch.cuda.get_rng_state(self.device)
        body = self._gradients if self.grad_sync is not None else self._eager

        def warmup() -> None:
            for _ in range(GRAPH_WARMUP_STEPS):  # gradients only: the weights do not change
                self.zero_grad(force=True)
                body([static], self.static_rows)
            self.zero_grad(force=True)  # the captured backward allocates the gradients from the graph's pool
            # The graph gets a memory pool of its own: hand the warm-up's cached blocks back first, so the
            # peak stays that of one eager step rather than two (what doctor's sizing assumes).
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.set_rng_state(self._rng, self.device)

        self.graph, self.static_out = capture_cuda_graph(
            self.device, warmup, lambda: body([static], self.static_rows))
        self.graph_grads = [p.grad for p in self.params]

    def _load(self, batch: Batch) -> None:
        """Copy a batch into the graph's input rows (no host wait); rows past it keep old, unused images."""
        images = batch_images(batch)
        self.static_batch[: images.shape[0]].copy_(images, non_blocking=True)
        if self.static_labels is not None:
            self.static_labels[: images.shape[0]].copy_(batch[1], non_blocking=True)
        self.static_rows.fill_(images.shape[0])

    def _rebind(self) -> None:
        """Point every .grad back at the tensor the graph writes (should anything have replaced it)."""
        bind_grads(self.params, self.graph_grads)

    def forward_backward(self, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, grad_norm, check) for one optimisation step; the gradients are left unscaled and clipped.

        The update may be applied only when ``check`` is finite. Nothing here waits for the device.
        """
        if not self.use_graph:
            return self._eager(batches)
        if self.graph is None:
            try:
                self._capture(batches[0])
            except DdpmctlError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. an op that cannot be captured: train without the graph
                self.use_graph, self.graph, self.static_out = False, None, None
                if self._rng is not None:  # the eager step draws what the graph would have
                    torch.cuda.set_rng_state(self._rng, self.device)
                self.zero_grad(force=True)
                if classify_oom(exc) is not None:
                    raise
                self.graph_note = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:120]}); training without it"
                return self._eager(batches)
        else:
            self._load(batches[0])  # the engine's batches never exceed graph_batch
        self.graph.replay()
        if self.grad_sync is not None:  # the graph left this rank's gradients: average them, then clip
            return self._finish(self.static_out)
        return self.static_out

    # -- the step ---------------------------------------------------------------------------------

    def step(self, batches: list[Batch]) -> StepResult:
        """One optimisation step over ``batches`` (the micro-batches); waits for the device only on MPS and fp16."""
        loss, grad_norm, check = self.forward_backward(batches)
        if self.distributed:  # every rank takes the same decision: a sum is finite only if every rank's is
            check = check.detach().float().reshape(1)
            dist.all_reduce(check)
            self._count_failed_captures()
        skipped = (~torch.isfinite(check)).reshape(()).float()
        if self.skip_on_device:
            self.optimizer.found_inf = skipped  # read by fused AdamW, as GradScaler uses it: 1.0 skips the update
            self._update()
        elif not bool(skipped):
            self._update()
        else:
            self.scaler.update()  # fp16: the scaler backs off after a non-finite step
        self.scheduler.step()
        self.zero_grad()
        if self.ema is not None:
            self.ema.update(self.model)
        return StepResult(loss, grad_norm, skipped)

    def _update(self) -> None:
        if self.graph is not None:
            self._rebind()  # AdamW would silently skip parameters whose .grad was set to None
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _count_failed_captures(self) -> None:
        """Once, under GradSync: how many ranks train without the graph (only rank 0 speaks, so it is told)."""
        if self.grad_sync is None or self.graph_checked:
            return
        self.graph_checked = True
        failed = torch.tensor([float(self.graph is None)], device=self.device)
        dist.all_reduce(failed)
        if failed.item() and not self.graph_note:
            self.graph_note = (f"CUDA graph capture failed on {int(failed.item())} of {dist.get_world_size()} "
                               "ranks; they train without it")

    def zero_grad(self, force: bool = False) -> None:
        """Drop the gradients after an update. A captured graph overwrites its own each replay and GradSync
        clears its buffer before each backward, so those stay (re-binding them would only cost time)."""
        if force or (self.graph is None and self.grad_sync is None):
            self.optimizer.zero_grad(set_to_none=True)

    def reset_graph(self, graph_batch: int) -> None:
        """Drop the captured graph and its memory: the next step captures one for ``graph_batch`` images
        (doctor's probe, which measures one batch size after another; a capture that ran out of memory
        at one size may fit at the next)."""
        if self.graph is not None:
            self.graph = self.static_out = self.static_batch = self.static_rows = self.static_labels = None
            self.graph_grads = []
            self.zero_grad(force=True)
        self.graph_batch, self.use_graph = graph_batch, self.graph_wanted
