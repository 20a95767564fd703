"""The edit's room: the connector alone (`connector`), or the connector and the last K layers of the
vision tower that the LLM's features pass through (`vision:K`).

Either way only the visual side changes: a text-only prompt never runs the tower or the connector, so
text answers cannot move. With K layers the features are cached at the input of the first edited
layer (the tower below it still runs once per picture, and is dropped), and the edited layers run in
the job's forward as functions of their fp32 masters, keyed `tower.<layer index>.<parameter name>`.
Counting follows the layer the LLM reads: LLaVA reads hidden state -2, so with `vision:1` the edited
layer is the second-to-last of the stack, and the last layer (never read) stays as stored."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import UserError

TOWER = "tower."  # key prefix of an edited tower layer's parameters


def tower_layers(scope: str) -> int:
    """K of `vision:K` (0 for `connector`)."""
    if scope == "connector":
        return 0
    match = re.fullmatch(r"vision:([1-9][0-9]*)", scope or "")
    if not match:
        raise UserError(f"--scope {scope!r}: expected connector or vision:K (K = how many of the tower's last layers "
                        "change, e.g. vision:2)")
    return int(match.group(1))


@dataclass
class TowerStack:
    """A vision tower's plain stack of layers, as the family's model holds it."""

    path: str  # attribute path of the stack in `model.model`, also the stem of its stored tensor names
    layers: torch.nn.ModuleList
    read: int  # how many of its layers the features the LLM reads pass through (from the first)
    after: torch.nn.Module | None = None  # frozen, between the layer read and the connector (SigLIP's post-LayerNorm)


def layers_read(read, layers: int) -> int:
    """How many of a tower's `layers` the features pass through when the connector reads its hidden state
    `read` (transformers' `vision_feature_layer`: 0 the embeddings, -1 the last layer's output)."""
    if not isinstance(read, int):
        raise UserError(f"--scope vision:K: this checkpoint's connector reads several tower layers ({read!r}), so "
                        "there are no last K layers its features pass through; use --scope connector")
    return read % (layers + 1)


def edited_layers(stack: TowerStack, k: int, family: str) -> list[int]:
    """Indices of the last `k` layers the LLM's features pass through."""
    if k > stack.read:
        raise UserError(f"--scope vision:{k}: the LLM reads this {family} checkpoint's tower after its layer "
                        f"{stack.read}, so at most {stack.read} layer(s) can change; use vision:1 to vision:{stack.read}")
    return list(range(stack.read - k, stack.read))


def tower_parameters(stack: TowerStack, indices: list[int]) -> dict[str, tuple[torch.nn.Parameter, str]]:
    """{key: (the parameter, the stem of its stored name)} of the edited layers."""
    return {f"{TOWER}{i}.{name}": (p, f"{stack.path}.{i}.{name}")
            for i in indices for name, p in stack.layers[i].named_parameters()}


def layer_params(params: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The parameters of edited layer `index`, by their names in the layer."""
    prefix = f"{TOWER}{index}."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def run_layers(layers: list[tuple[int, torch.nn.Module]], params: dict, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
    """The edited layers on their cached input, each with the job's parameters in place of its own."""
    for index, layer in layers:
        out = torch.func.functional_call(layer, layer_params(params, index), (hidden,), kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def allowed_stems(stack: TowerStack, indices: list[int]) -> tuple[str, ...]:
    """Stored-name stems of the edited layers (`<path>.<index>.`)."""
    return tuple(f"{stack.path}.{i}." for i in indices)


def open_scope(adapter, model, k: int) -> dict[str, tuple[torch.nn.Parameter, str]]:
    """Give `adapter` the last `k` layers of `model`'s tower to edit; their parameters and stored stems."""
    if not k:
        return {}
    stack = adapter.tower_stack(model)
    indices = edited_layers(stack, k, adapter.family)
    adapter.edited = tuple((i, stack.layers[i]) for i in indices)
    adapter.edited_stems = allowed_stems(stack, indices)
    adapter.tower_after = stack.after
    return tower_parameters(stack, indices)
