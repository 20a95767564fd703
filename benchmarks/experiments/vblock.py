"""Experiment (issue 9): train the last CLIP layer that LLaVA reads together with the projector.
The projector sees one token at a time; that layer's attention sees the whole picture. Text never
goes through the tower, so text answers stay bit-identical. Monkeypatches, LLaVA only."""
import copy, torch
from torch.func import functional_call
import fastunlearn.job as job
import fastunlearn.load as load
from fastunlearn.models import llava as L
import compare

PREFIX = "vblock."
BLOCKS = {}  # id(model) -> fp32 copy of the last read CLIP layer

def _index(model):
    tower = model.model.vision_tower
    blocks = getattr(tower, "vision_model", tower).encoder.layers
    k = model.config.vision_feature_layer % (len(blocks) + 1)
    return k, blocks

_open = load.open_checkpoint
def open_checkpoint(ckpt, device, llm_later=False):
    loaded = _open(ckpt, device, llm_later)
    k, blocks = _index(loaded.model)
    block = copy.deepcopy(blocks[k - 1]).float()
    BLOCKS[id(loaded.model)] = block
    stored = list(loaded.stored)
    for n, _ in block.named_parameters():
        suffix = f"encoder.layers.{k - 1}.{n}"
        hit = [s for s in stored if s.endswith(suffix)]
        assert len(hit) == 1, (suffix, hit)
        loaded.names[PREFIX + n] = hit[0]
        loaded.original[PREFIX + n] = load.st.read_tensor(loaded.stored[hit[0]])
    return loaded

@torch.no_grad()
def vision_features_batch(self, model, pixels):
    config = model.config
    tower = model.model.vision_tower
    values = torch.cat([p["pixel_values"] for p in pixels]).to(tower.device, tower.dtype)
    k, _ = _index(model)
    (hidden,) = L._hidden_states(tower, values, [k - 1])  # the input of layer k-1, CLS included
    return [f.contiguous() for f in hidden.float().unbind(0)]

def project_images(self, model, params, features, grids):
    block = BLOCKS[id(model)]
    bp = {n[len(PREFIX):]: p for n, p in params.items() if n.startswith(PREFIX)}
    x = torch.stack(features)
    y = functional_call(block, bp, (x, None))
    y = y[0] if isinstance(y, tuple) else y
    if model.config.vision_feature_select_strategy == "default":
        y = y[:, 1:]
    pp = {n: p for n, p in params.items() if not n.startswith(PREFIX)}
    return list(self.project(pp, y.reshape(-1, y.shape[-1])).split([y.shape[1]] * len(features)))

def install():
    job.open_checkpoint = open_checkpoint
    compare.open_checkpoint = open_checkpoint
    L.LlavaAdapter.vision_features_batch = vision_features_batch
    L.LlavaAdapter.project_images = project_images
