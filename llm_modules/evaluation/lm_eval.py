"""lm-evaluation-harness (lm_eval 0.4.x) adapter for the composed model, registered as "llm-modules".

    import lm_eval, llm_modules.evaluation.lm_eval  # importing registers the name (the lm_eval CLI cannot)
    lm_eval.simple_evaluate(model="llm-modules", model_args="pretrained=runs/x/final,batch_size=8", tasks=[...])
    # or with a model already in memory:
    lm_eval.simple_evaluate(model=LLMModulesLM(model=composed), tasks=[...])

Text goes through the LARGE model's tokenizer (the composed model's vocabulary; with head "own" the
small model's: `model.tokenizer`). Sequences never exceed `max_length`, which is capped by the composed model's position limit (`max_positions`, the
smaller of the large and small models' limits).
This module is the only place that imports lm_eval; `import llm_modules` does not need it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from llm_modules.bridges import LargeRead
from llm_modules.decoding.sampling import SamplingOptions
from llm_modules.errors import LLMModulesError
from llm_modules.tensors import DTYPES, left_pad, right_pad

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # a test hides lm_eval to check this message
    raise LLMModulesError("the lm-eval adapter needs lm-evaluation-harness: pip install 'llm-modules[eval]'") from exc
from tqdm import tqdm

logger = logging.getLogger(__name__)


def _dtype(value: Any) -> torch.dtype | None:
    """A name in DTYPES | a torch.dtype | None -> torch.dtype or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value in DTYPES:
        return DTYPES[value]
    raise LLMModulesError(f"unknown dtype {value!r}; use {', '.join(DTYPES)}")


@register_model("llm-modules", "llm_modules")
class LLMModulesLM(TemplateLM):
    """lm_eval model over an `LLMModulesModel`: loglikelihood, loglikelihood_rolling, generate_until.

    Give `pretrained=<folder written by save_pretrained>` or `model=<LLMModulesModel>` (moved to
    `device` and put in eval mode). `tokenizer` overrides the model's own (needed when the model
    has none). `max_length` (default: the smaller of the two models' position limits) bounds every
    sequence; `max_gen_toks` is the default generation budget. `add_bos_token=None` prepends BOS
    exactly when the tokenizer itself does, as in training.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int | str | None = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
        large_dtype: str | torch.dtype | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        **unused: Any,
    ):
        super().__init__()
        if (pretrained is None) == (model is None):
            raise LLMModulesError("give exactly one of pretrained=<model folder> or model=<LLMModulesModel>")
        if pretrained is not None:
            from llm_modules.models.composed import LLMModulesModel

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = LLMModulesModel.from_pretrained(pretrained, _dtype(dtype), _dtype(large_dtype), device)
        elif device is not None:
            model.to(device)
        self.model = model.eval()
        self._device = model.device
        ignored = {k: v for k, v in unused.items() if v is not None}
        if ignored:
            logger.warning("llm-modules: ignoring unsupported model arguments %s", sorted(ignored))

        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        if self.tokenizer is None:
            raise LLMModulesError("this model has no tokenizer files; pass tokenizer=<the large model's tokenizer>")
        if add_bos_token is None:
            bos, plain = self.tokenizer.bos_token_id, self.tokenizer("a", add_special_tokens=False)["input_ids"]
            add_bos_token = bos is not None and self.tokenizer("a")["input_ids"] == [bos, *plain]
        self.add_bos_token = bool(add_bos_token)
        self._prefix_token_id = prefix_token_id

        batch_size = 1 if batch_size is None else batch_size
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise LLMModulesError(f"batch_size must be a positive integer ('auto' is unsupported): {batch_size!r}")
        self.batch_size = int(batch_size)
        cap = model.max_positions or 2048
        if max_length is not None and int(max_length) > cap:
            logger.warning("llm-modules: max_length=%s exceeds the models' position limit; using %d", max_length, cap)
        self._max_length = min(int(max_length), cap) if max_length is not None else cap
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ lm_eval plumbing
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = getattr(getattr(self.model.large, "generation_config", None), "eos_token_id", None)
            eos = eos[0] if isinstance(eos, list) else eos
        if eos is None:
            raise LLMModulesError("neither the tokenizer nor the large model defines the eos_token_id lm_eval needs")
        return eos

    @property
    def prefix_token_id(self) -> int:
        """Token a context-free text is conditioned on: the given one, else BOS, else EOS."""
        if self._prefix_token_id is not None:
            return int(self._prefix_token_id)
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    max_length = property(lambda self: self._max_length)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:  # add BOS as in training, unless the text already starts with it
            bos = self.tokenizer.bos_token
            add_special_tokens = self.add_bos_token and not (bos and string.startswith(bos))
        return list(self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"])

    def _pad(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists -> (B, T) ids and 0/1 mask on the model's device, padded on the left or right."""
        return (left_pad if left else right_pad)(rows, self.eot_token_id, self.device)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """requests: [(cache key or None, context ids, continuation ids)] -> [(log p(continuation), is_greedy)].

        Each row feeds (context + continuation)[:-1], left-truncated to `max_length`, right-padded
        in a batch; the head only runs from the earliest continuation position of the batch on.
        """
        for key, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise LLMModulesError(
                    f"cannot score {key!r}: needs a non-empty context and 1..{self.max_length} continuation tokens"
                )
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), "llm-modules scoring", disable=disable_tqdm):
            batch = order[start : start + self.batch_size]
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in batch]
            ids, mask = self._pad(inputs, left=False)
            width, first = ids.shape[1], min(len(x) - len(requests[i][2]) for x, i in zip(inputs, batch))
            # where each continuation starts (x ends one token before it does): a model that reads the
            # large model's states of the prompt only reads the context's
            start = torch.tensor([len(x) - len(requests[i][2]) + 1 for x, i in zip(inputs, batch)], device=self.device)
            logits = self.model.forward_read(LargeRead(answer_start=start), input_ids=ids, attention_mask=mask,
                                             logits_to_keep=width - first).logits
            # logits (B, width - first, V) cover positions first .. width - 1
            for row, (x, i) in enumerate(zip(inputs, batch)):
                cont = torch.tensor(requests[i][2], device=logits.device)
                end = len(x) - first
                logprobs = torch.log_softmax(logits[row, end - len(cont) : end].float(), dim=-1)  # (C, V)
                score = float(logprobs.gather(-1, cont[:, None]).sum())
                greedy = bool((logprobs.argmax(dim=-1) == cont).all())
                results[i] = (score, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood, conditioned on `prefix_token_id`, in disjoint `max_length` windows."""
        windows, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            pairs = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[n] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _generation_options(self, gen_kwargs: dict) -> tuple[list[str], SamplingOptions]:
        """lm_eval gen_kwargs -> (stop strings, how to decode: ends at `eot_token_id` or a stop string)."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = next((kwargs.pop(k) for k in ("max_gen_toks", "max_new_tokens") if k in kwargs), self.max_gen_toks)
        temperature = kwargs.pop("temperature", None)
        do_sample = kwargs.pop("do_sample", None)
        if do_sample is None:
            do_sample = temperature is not None and float(temperature) > 0
        if do_sample and temperature is not None and float(temperature) <= 0:
            logger.warning("llm-modules: do_sample with temperature 0 decodes greedily")
            do_sample = False
        options: dict[str, Any] = {"do_sample": bool(do_sample)}
        if do_sample:
            options["temperature"] = float(temperature) if temperature is not None else 1.0
        for name, cast in (("top_k", int), ("top_p", float), ("repetition_penalty", float), ("min_new_tokens", int)):
            if name in kwargs:
                options[name] = cast(kwargs.pop(name))
        if kwargs:
            logger.warning("llm-modules: ignoring unsupported generation arguments %s", sorted(kwargs))
        return until, SamplingOptions(max_new_tokens=int(max_new), stop_strings=until or None,
                                      eos_token_ids=[self.eot_token_id], **options)

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Left-padded batches of requests sharing gen_kwargs; each answer is cut before its first stop string."""
        results: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="llm-modules generating", disable=disable_tqdm)
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        for members in groups.values():
            until, options = self._generation_options(requests[members[0]].args[1])
            room = self.max_length - options.max_new_tokens
            if room < 1:
                raise LLMModulesError(f"max_gen_toks={options.max_new_tokens} leaves no prompt room in "
                                      f"max_length={self.max_length}")
            prompts = {n: (self.tok_encode(requests[n].args[0]) or [self.prefix_token_id])[-room:] for n in members}
            members = sorted(members, key=lambda n: -len(prompts[n]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                ids, mask = self._pad([prompts[n] for n in batch], left=True)
                out = self.model.generate(ids, mask, options, pad_token_id=self.eot_token_id, tokenizer=self.tokenizer)
                for row, n in enumerate(batch):
                    new = out[row, ids.shape[1] :].tolist()
                    if self.eot_token_id in new:
                        new = new[: new.index(self.eot_token_id)]
                    text = self.tokenizer.decode(new, skip_special_tokens=True)
                    for stop in until:
                        text = text.split(stop)[0]
                    results[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
                progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]
