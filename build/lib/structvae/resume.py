"""Resuming under a config: the config given now decides every setting, the checkpoint only the training state.

LightningCLI's own rule is the other way round: it re-parses a checkpoint's hyper-parameters over the config,
so ``--model.optimizer.init_args.lr=1e-4`` on a resume is silently dropped, and a ``digits`` checkpoint
resumed under ``digits_sos`` trains the Bernoulli model. Here (see ``structvae.lightning_cli``):

* :func:`check_resumable` refuses, in one line, a checkpoint whose weights do not fit the model the config
  builds (another posterior, likelihood, network or model class, other shapes, weights added or missing), and
  lists every other setting that differs so the CLI can say that this config's values apply;
* :func:`adopt_current_settings` (``StructVAE.on_load_checkpoint``) makes those values apply to the state
  Lightning restores: the optimizer's param-group hyper-parameters (``lr``, ``betas``, …; the multipliers'
  ``lr`` from ``multiplier_lr``) and the objective's buffers (constraint targets), which are settings, not
  learned state. Momenta, multipliers, weights and the loop position still come from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from structvae.private_api import CLI_CONFIG_KEY

#: Parts whose class decides what the weights mean: resuming under another one is refused.
STRUCTURAL_PARTS = ("_class_path", "posterior", "likelihood", "encoder", "decoder", "optimizer")


class IncompatibleCheckpointError(ValueError):
    """The checkpoint's model is not the one this config builds; the message says what differs and what to do."""


def flat_settings(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer.init_args.lr": 0.001, …}``: the leaves of a nested config (tuples as lists, so that a
    value read from a checkpoint and one parsed now compare equal)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if key == CLI_CONFIG_KEY:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_settings(value, name + "."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Setting → (checkpoint's value, this config's value) for every setting that differs (absent: ``None``)."""
    before, after = flat_settings(old), flat_settings(new)
    return {k: (before.get(k), after.get(k)) for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k)}


def _class_name(config: Any) -> str:
    path = config.get("class_path") if isinstance(config, Mapping) else config
    return str(path).rsplit(".", 1)[-1] if path else "none"


def check_resumable(checkpoint: Mapping[str, Any], model: nn.Module, path: str,
                    datamodule_hparams: Mapping[str, Any] | None = None) -> list[str]:
    """``"setting: old → new"`` for each setting this config changes relative to the checkpoint at ``path``.

    Raises:
        IncompatibleCheckpointError: another model class or part class (posterior, likelihood, networks,
            optimizer), or weights that do not match the model's by name and shape.
    """
    advice = (f"resume {path} with the config it was trained with (the config.yaml of its run folder), or leave "
              "out --ckpt_path to start a new run")
    old = dict(checkpoint.get("hyper_parameters") or {})
    new = dict(getattr(model, "hparams", {}) or {})
    configured = CLI_CONFIG_KEY in old and CLI_CONFIG_KEY in new  # both built from a config: settings to compare
    for part in STRUCTURAL_PARTS if configured else ():
        if part in old and part in new and _class_name(old[part]) != _class_name(new[part]):
            name = "model" if part == "_class_path" else part
            raise IncompatibleCheckpointError(
                f"checkpoint {path} was trained with {name} {_class_name(old[part])}, this config builds "
                f"{_class_name(new[part])}; {advice}")
    saved, built = checkpoint.get("state_dict") or {}, model.state_dict()
    missing = [k for k in built if k not in saved]
    extra = [k for k in saved if k not in built]
    reshaped = [k for k in built if k in saved and tuple(saved[k].shape) != tuple(built[k].shape)]
    if missing or extra or reshaped:
        if reshaped:
            k = reshaped[0]
            what = f"{len(reshaped)} weight tensor(s) of another shape (e.g. {k}: {tuple(saved[k].shape)} in " \
                   f"the checkpoint, {tuple(built[k].shape)} here)"
        else:
            k = (missing or extra)[0]
            what = f"{len(missing)} weight tensor(s) of this model missing from it and {len(extra)} of its " \
                   f"unknown here (e.g. {k})"
        raise IncompatibleCheckpointError(f"checkpoint {path} holds another model than this config builds: "
                                          f"{what}; {advice}")
    lines = [f"model.{k}: {a} → {b}" for k, (a, b) in changed_settings(old, new).items()] if configured else []
    old_data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if old_data and datamodule_hparams is not None:
        lines += [f"data.{k}: {a} → {b}" for k, (a, b) in changed_settings(old_data, datamodule_hparams).items()]
    return lines


def adopt_current_settings(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Edit ``checkpoint`` (before Lightning restores it into ``model`` and its optimizer) so that the settings
    ``model`` was built with win over the checkpoint's where they differ (see the module docstring).

    Only modules built from a config (LightningCLI, ``CLI_CONFIG_KEY`` in both hyper-parameter sets) carry
    settings to compare; anything else is left alone.
    """
    old, new = checkpoint.get("hyper_parameters") or {}, dict(getattr(model, "hparams", {}) or {})
    if CLI_CONFIG_KEY not in old or CLI_CONFIG_KEY not in new:
        return
    changes = changed_settings(old, new)
    objective = getattr(model, "objective", None)
    if objective is not None and any(k.startswith("objective") for k in changes):
        state = checkpoint.get("state_dict", {})
        for name, buffer in objective.named_buffers():  # constraint targets: settings, kept as built
            if f"objective.{name}" in state:
                state[f"objective.{name}"] = buffer.detach().clone()
    prefix = "optimizer.init_args."
    group_values = {"model": {k.removeprefix(prefix): b for k, (_, b) in changes.items() if k.startswith(prefix)}}
    if "objective.init_args.multiplier_lr" in changes and objective is not None:
        group_values["multipliers"] = {"lr": objective.multiplier_lr}
    for optimizer_state in checkpoint.get("optimizer_states") or []:
        for group in optimizer_state.get("param_groups", []):
            for key, value in group_values.get(group.get("name", "model"), {}).items():
                if key in group and value is not None:
                    group[key] = tuple(value) if isinstance(group[key], tuple) else value
