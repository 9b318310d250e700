"""PyTorch Lightning: Perforated Backpropagation as one callback (``pip install apical[lightning]``).

::

    from apical.integrations.lightning import DendriteCallback

    callback = DendriteCallback(apical.DendriteConfig(max_dendrites=2), monitor="val_acc", mode="max")
    trainer = L.Trainer(max_epochs=500, callbacks=[callback])     # "ddp" strategies work too
    trainer.fit(lit_module, train_loader, val_loader)
    # lit_module now holds the best network found; callback.history is the controller's record

The LightningModule logs ``monitor`` once per validation epoch (``self.log("val_acc", acc,
sync_dist=True)``) and builds its optimiser from the parameters that train
(``[p for p in self.parameters() if p.requires_grad]``; plain ``self.parameters()`` works too
with Adam-like optimisers, which skip parameters without gradient). The callback

* perforates the module in ``setup`` (the whole LightningModule by default, or the submodule
  named by ``module``; a module that is already perforated is kept as it is) and creates the
  :class:`~apical.Controller` on it;
* calls ``controller.step(trainer.callback_metrics[monitor])`` at the end of every validation
  run of ``fit`` (never in the sanity check), so validate once per training epoch;
* after a restructure, rebuilds DDP (DDP strategies) and the optimisers and LR schedulers
  (``trainer.strategy.setup_optimizers(trainer)``, which calls ``configure_optimizers``);
* stops the trainer when the cycle is done (``trainer.should_stop``); at the end of training
  the module holds the best network found (``Controller.finish`` when the epoch budget ran out
  first).

Under DDP strategies (``"ddp"``, ``"ddp_spawn"``, ``"ddp_notebook"``) every rank takes the same
decisions (see :mod:`apical.distributed`). With ``"ddp_spawn"``, the grown network lives in the
worker processes: Lightning copies rank 0's weights back into the main process's module by
parameter name, which does not fit a module whose structure changed, so pass ``save_path`` and
``apical.load(save_path, fresh_module)`` in the main process, or use ``"ddp"`` (``torchrun``).
Other strategies (FSDP, DeepSpeed) are not supported.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from apical.dendrites import Controller, DendriteConfig, Step, _dist, dendritic_layers, perforate
from apical.distributed import _ignore_empty_parameters, save_on_main

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ImportError:  # pragma: no cover - the standalone package
    try:
        import pytorch_lightning as pl
        from pytorch_lightning.callbacks import Callback
        from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
    except ImportError as err:
        raise ImportError(
            "apical.integrations.lightning needs PyTorch Lightning (>= 2.1): pip install apical[lightning]"
        ) from err

__all__ = ["DendriteCallback"]


class DendriteCallback(Callback):
    """Grow dendrites on a LightningModule during ``Trainer.fit``.

    Args:
        config: the :class:`~apical.DendriteConfig` (default: ``DendriteConfig()``).
        monitor: the logged validation metric the cycle follows.
        mode: ``"max"`` when a higher ``monitor`` is better (accuracy), ``"min"`` for a loss.
        module: name of the submodule to perforate (``pl_module.get_submodule(module)``);
            ``None`` perforates every supported layer of the whole LightningModule.
        save_path: if given, an :func:`apical.save` checkpoint (model and controller) of the final
            network is written there by global rank 0 when training ends.
    """

    def __init__(self, config: DendriteConfig | None = None, monitor: str = "val_acc", mode: str = "max",
                 module: str | None = None, save_path: str | os.PathLike | None = None) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f'DendriteCallback mode must be "max" or "min", got {mode!r}')
        self.config = config or DendriteConfig()
        self.monitor = monitor
        self.mode = mode
        self.module = module
        self.save_path = save_path
        self.controller: Controller | None = None
        self.last_step: Step | None = None
        self._final_state: dict[str, Tensor] | None = None
        self._saved = False

    @property
    def history(self) -> list[dict[str, Any]]:
        """The controller's per-epoch record (empty before ``fit``)."""
        return [] if self.controller is None else self.controller.history

    def _target(self, pl_module: pl.LightningModule) -> nn.Module:
        return pl_module if self.module is None else pl_module.get_submodule(self.module)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.controller is not None:
            return
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise NotImplementedError(
                f"DendriteCallback supports single-device and DDP strategies, not "
                f"{type(trainer.strategy).__name__}"
            )
        target = self._target(pl_module)
        if not dendritic_layers(target):
            perforate(target, self.config)
        self.controller = Controller(target, self.config, maximize=self.mode == "max")
        if isinstance(trainer.strategy, DDPStrategy):  # DDP wraps the LightningModule after setup
            _ignore_empty_parameters(pl_module)
            if _dist.world_size() > 1:
                _dist.group()  # apical's process group, created by every rank at the same point

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.controller is not None:
            # Lightning may call training_step without the module's __call__ (single device),
            # so the controller's forward hook is not enough to know that the epoch trained
            self.controller._forwards += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctl = self.controller
        if ctl is None or ctl.done or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise KeyError(
                f"DendriteCallback monitors {self.monitor!r}, which the LightningModule did not log in "
                f"validation; logged: {sorted(metrics)}"
            )
        step = ctl.step(metrics[self.monitor])
        self.last_step = step
        if step.restructured:
            self._rebuild(trainer)
        if step.done:
            trainer.should_stop = True
            self._final_state = {k: v.detach().clone() for k, v in self._target(pl_module).state_dict().items()}
            self._save(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctl = self.controller
        if ctl is None:
            return
        if not ctl.done:  # the epoch budget ran out first: keep or revert, load the best
            self.last_step = ctl.finish()
            self._save(pl_module)
        elif self._final_state is not None:  # e.g. min_epochs trained on after the cycle ended
            self._target(pl_module).load_state_dict(self._final_state)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # apical's process group goes while every rank is alive and in step, not at interpreter
        # exit, where tearing a gloo group down beside a peer that is exiting can abort a worker
        if stage == "fit" and isinstance(trainer.strategy, DDPStrategy):
            _dist.release()

    # ------------------------------------------------------------------ helpers
    def _rebuild(self, trainer: pl.Trainer) -> None:
        """New DDP wrapper (its reducer knew the previous trainable parameters) and optimisers."""
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
            old = strategy.model
            old._remove_autograd_hooks()
            strategy.model = old.module
            _ignore_empty_parameters(strategy.model)
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)

    def _save(self, pl_module: pl.LightningModule) -> None:
        if self.save_path is not None and not self._saved:
            save_on_main(self.save_path, self._target(pl_module), self.controller)
            self._saved = True
