"""The drafter method in the EAGLE-3 layout (`--drafter-layout eagle3`): one draft layer over three of the
target's taps (`models.eagle3`), trained from the state cache on the target's own next-token distribution, as
the composed drafter is, and saved as a folder that `export --format eagle3` turns into what vLLM loads.

Training-time test (EAGLE-3, Li et al. 2025): every position p of an example is a frontier at once. Step 1 reads
the target's taps at p and the token at p + 1 and predicts the token at p + 2; step j > 1 reads the draft's own
step j - 1 output at p and the token at p + j, one rope position further, seeing the target-state keys up to p
and its own earlier steps' keys at p: what vLLM's proposer computes after the frontier p at decode time
(`Eagle3Drafter.unroll`; a test holds it equal to step-by-step decoding). The loss sums the K steps' KL (or CE),
step j's target being the large model's distribution at p + j, over answer positions. The lags the composed
drafter learns from random block offsets, this one gets from the unroll: step j is lag j.

The draft layer is shaped as one of the target's layers (width, heads, key/value heads, MLP, rope), reads vLLM's
default taps (2, L // 2, L - 3), shares the target's input embedding (frozen, not saved; vLLM shares it too) and
starts its head from the target's output rows of the draft vocabulary (speculators does the same).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_modules.errors import LLMModulesError
from llm_modules.models.eagle3 import Eagle3Config, Eagle3Drafter
from llm_modules.models.eagle3_folder import EMBEDDINGS, save_eagle3
from llm_modules.tensors import IGNORE_INDEX, positions_from_mask
from llm_modules.training.objectives.base import _count, large_loading
from llm_modules.training.objectives.drafter import DrafterObjective

LOSS_CHUNK = 256  # positions per head chunk (recomputed in the backward pass): one chunk's logits in memory


class TargetSide:
    """The frozen target as the drafter objective's state cache and generated answers read it: its model,
    tokenizer, layer count, output head and `encode_large` at any taps (the composed model's surface, without
    a small model to compose)."""

    def __init__(self, config: Any, device: Any = "cpu", processes: int = 1):
        from llm_modules.decoding.steppers import Decoder
        from llm_modules.models.specs import resolve_model

        loading = large_loading(config, device, processes)
        loaded = resolve_model(config.large, dtype=loading["dtype"], placement=loading["placement"])
        self.large, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self.large.requires_grad_(False)
        self.placed = bool(loading["placement"])
        text = self.large.config.get_text_config()
        self.config = SimpleNamespace(large=config.large, large_reads="all", head=None)
        self.num_large_layers, self.vocab_size = text.num_hidden_layers, text.vocab_size
        self.max_positions = getattr(text, "max_position_embeddings", None)
        self.large_head = self.large.get_output_embeddings()
        self.large_taps: list[int] = []
        self._decoder = Decoder(self.large.base_model)

    def encode_large(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                     taps: list[int] | None = None) -> tuple[torch.Tensor, Any]:
        from llm_modules.models.large import tapped_states

        return tapped_states(self._decoder, taps or self.large_taps, self.num_large_layers, input_ids=input_ids,
                             attention_mask=attention_mask, position_ids=position_ids)

    def release_large(self, keep_head: bool = True) -> bool:
        return False  # kept: it is the frozen target the head's targets come from

    def place(self, device: Any) -> None:
        if not self.placed:
            self.large.to(device)


class Eagle3Parts(nn.Module):
    """What DDP or FSDP wraps: the draft network (set once the draft vocabulary is known). Its forward unrolls
    the training-time test over a batch and returns (summed loss over K steps, step-1 top-1 agreements)."""

    def __init__(self, large_head: nn.Module, kind: str, steps: int):
        super().__init__()
        self.kind, self.steps = kind, steps
        self.drafter: Eagle3Drafter | None = None
        self.vocab: torch.Tensor | None = None
        object.__setattr__(self, "large_head", large_head)  # frozen, outside what the wrapper sees

    def forward(self, target_states: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, large_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.drafter
        dtype = d.fc.weight.dtype
        b, t = input_ids.shape
        tokens = torch.cat([input_ids[:, 1:], input_ids.new_zeros(b, 1)], 1)  # the token at p + 1 sits at p
        fused = d.fuse(large_states.to(d.fc.weight.device, dtype))  # (B, T, H)
        outs = d.unroll(tokens, fused, positions_from_mask(attention_mask), attention_mask, self.steps)
        labels = labels.to(fused.device)
        total, agree = fused.new_zeros(()), None
        for j, out in enumerate(outs):  # step j + 1 at p predicts the token at p + j + 2
            n = t - j - 2
            if n <= 0:
                break
            keep = labels[:, j + 2:] != IGNORE_INDEX  # (B, n)
            s = out[:, :n][keep]  # (N, H)
            h = target_states[:, j + 1: j + 1 + n].to(fused.device)[keep]  # (N, dL): the target's state there
            loss, agreements = self._loss(s, h)
            total = total + loss
            agree = agreements if agree is None else agree
        return total, (agree if agree is not None else total.new_zeros((), dtype=torch.long))

    def _loss(self, s: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.large_head.weight.detach()
        rows = None if self.vocab is None else self.vocab.to(weight.device)
        sub = weight if rows is None else weight[rows]  # (Vd, dL)
        exact = not torch.is_grad_enabled()
        d = self.drafter

        def chunk(s_i: torch.Tensor, h_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = d.head(s_i).float()  # (n, Vd)
            with torch.no_grad():
                h_i = h_i.to(weight.device, weight.dtype)
                target = F.linear(h_i, sub).to(logits.device).float()
                mine = logits.detach().argmax(-1)
                if rows is not None and exact:  # against the whole vocabulary's arg-max
                    agree = rows.to(mine.device)[mine] == self.large_head(h_i).argmax(-1).to(mine.device)
                else:
                    agree = mine == target.argmax(-1)
            if self.kind == "kl":
                loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True,
                                reduction="sum")
            else:
                loss = F.cross_entropy(logits, target.argmax(-1), reduction="sum")
            return loss, agree.sum()

        run = partial(checkpoint, chunk, use_reentrant=False) if torch.is_grad_enabled() else chunk
        parts = [run(s[i: i + LOSS_CHUNK], h[i: i + LOSS_CHUNK]) for i in range(0, s.shape[0], LOSS_CHUNK)]
        if not parts:
            return s.sum() * 0, torch.zeros((), dtype=torch.long, device=s.device)
        return sum(p[0] for p in parts), sum(p[1] for p in parts)


class Eagle3Objective(DrafterObjective):
    """`--method drafter --drafter-layout eagle3`: the EAGLE-3 draft layer over the target's cached taps.
    Saves `models.eagle3_folder`'s folder (EAGLE3_FILE, model.safetensors without the shared embedding) and the
    drafter record."""

    loss_is_answer_nll = False

    def __init__(self, config: Any, device: Any = "cpu", processes: int = 1):
        options = config.method_options
        self.model = TargetSide(config, device, processes)
        if self.model.tokenizer is None:
            raise LLMModulesError(f"the large model {config.large!r} has no tokenizer; training needs one")
        self.tokenizer, self.max_positions = self.model.tokenizer, self.model.max_positions
        self.eagle3 = Eagle3Config.for_target(self.model.large.config, target=config.large)
        self.module = Eagle3Parts(self.model.large_head, options.drafter_loss, options.draft_tokens)
        final = self.model.num_large_layers
        if self.eagle3.taps[-1] >= final:
            raise LLMModulesError(f"EAGLE-3 taps {self.eagle3.taps} reach past the target's {final} layers")
        self._drafter_setup(config, self.eagle3.taps, final)  # the draft's taps and the final (normed) state
        self.states: dict[str, Any] = {"train": None, "val": None}
        self.released, self.cache_seconds, self.cache_keys = False, 0.0, []
        self.device: Any = device

    @property
    def drafter(self) -> Eagle3Drafter:
        if self.module.drafter is None:
            raise LLMModulesError("the EAGLE-3 drafter is built once the data (and its draft vocabulary) is known")
        return self.module.drafter

    def attach_data(self, config: Any, data: Any, accelerator: Any) -> None:
        super().attach_data(config, data, accelerator)  # generated answers, the state cache, the draft vocabulary
        vocab = self.module.vocab
        size = self.model.vocab_size if vocab is None else int(vocab.numel())
        self.eagle3.draft_vocab_size = size
        torch.manual_seed(config.train.seed)
        drafter = Eagle3Drafter(self.eagle3)
        with torch.no_grad():
            drafter.embed_tokens.weight.copy_(self.model.large.get_input_embeddings().weight.float())
            head = self.model.large_head.weight.detach().float()
            drafter.lm_head.weight.copy_(head if vocab is None else head[vocab.to(head.device)])
            if vocab is not None:
                drafter.set_draft_vocab(vocab)
        drafter.embed_tokens.weight.requires_grad_(False)
        drafter.shares_embeddings = True
        self.module.drafter = drafter.to(self.device)

    def place(self, device: torch.device) -> None:
        self.device = device
        self.model.place(device)
        if self.module.drafter is not None:
            self.module.drafter.to(device)

    def param_groups(self, config: Any) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.drafter.parameters() if p.requires_grad], "lr": config.train.lr_small}]

    def batch_extras(self, split: str, indices: list[int], width: int) -> dict[str, torch.Tensor]:
        states = self.states[split].batch(indices, pad_to=width)  # (B, W, Kc, dL)
        return {"large_states": states[:, :, self._bridge], "target_states": states[:, :, self._final]}

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        return {"drafter": _count(self.drafter)}

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.drafter.state_dict().items() if k != EMBEDDINGS}

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = {k.removeprefix("drafter."): v for k, v in state.items()}
        missing, unexpected = self.drafter.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {EMBEDDINGS}:
            raise LLMModulesError(f"EAGLE-3 weights do not match the drafter (missing {missing[:4]}, unexpected "
                                  f"{unexpected[:4]})")

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        tensors = None if state is None else {k.removeprefix("drafter."): v for k, v in state.items()}
        folder = save_eagle3(self.drafter, directory, tensors)
        self.record.vocab = 0 if self.module.vocab is None else int(self.module.vocab.numel())
        self.record.save(folder)
        return folder

    def before_generation(self) -> None:
        pass

    def scorer(self) -> Any:
        raise LLMModulesError("--drafter-layout eagle3 writes no text samples (it drafts for the target); use "
                              "--num-samples 0, and decode with --draft")
