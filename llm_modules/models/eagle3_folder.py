"""EAGLE-3 drafter folders: ours (`EAGLE3_FILE` + `WEIGHTS_FILE` + the drafter record), the `speculators`
format vLLM reads most directly (`export_eagle3` writes it), and EAGLE's plain `LlamaForCausalLMEagle3` layout
(`load_eagle3` reads both, so a drafter trained elsewhere runs in our engine).

The speculators config, as vLLM 0.32.0 reads it (`transformers_utils/configs/speculators/{base,algos}.py`):
`speculators_model_type: "eagle3"`, `transformer_layer_config` (a Llama layer config whose `vocab_size` is the
target's), `draft_vocab_size`, `eagle_aux_hidden_state_layer_ids` (ascending), `target_hidden_size`, and the
norms' switches. Two of vLLM's defaults differ from speculators' own, so the exporter writes every switch:
`norm_before_residual` is True in vLLM when absent (False in speculators), and vLLM sizes `fc` from
`num_aux_hidden_states` (else 3), not from the tap list, so that key goes into `transformer_layer_config`
whenever there are not 3 taps. vLLM loads a folder missing `d2t` (or any tensor) without a word, so the
exporter checks its own tensor names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from llm_modules.errors import LLMModulesError
from llm_modules.models.eagle3 import (
    EAGLE3_FILE,
    Eagle3Config,
    Eagle3Drafter,
    default_taps,
)
from llm_modules.models.saved import RUN_MODELS, WEIGHTS_FILE, load_weights

EAGLE3_FORMATS = ("eagle3",)
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose format is written (and that the numeric test loads)
PLAIN_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
EMBEDDINGS = "embed_tokens.weight"


def eagle3_kind(folder: str | Path) -> str | None:
    """'ours', 'speculators' or 'plain' for an EAGLE-3 drafter folder (a run folder: its best/, else last/);
    None for anything else."""
    folder = Path(folder)
    if (folder / EAGLE3_FILE).is_file():
        return "ours"
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except ValueError:
            return None
        if data.get("speculators_model_type") == "eagle3":
            return "speculators"
        if any(a in PLAIN_ARCHITECTURES for a in data.get("architectures") or []):
            return "plain"
    return None


def eagle3_folder(folder: str | Path) -> Path | None:
    """The EAGLE-3 folder `folder` names (itself, or a training run's best/, else last/), None if none."""
    folder = Path(folder)
    if eagle3_kind(folder):
        return folder
    for name in RUN_MODELS:
        if (folder / name / EAGLE3_FILE).is_file():
            return folder / name
    return None


# ---------------------------------------------------------------------------------------------- ours
def save_eagle3(model: Eagle3Drafter, directory: str | Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Our folder: the description and the tensors (the embedding left out when it is the target's)."""
    from llm_modules.models.saved import save_weights

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory)
    state = tensors if tensors is not None else model.state_dict()
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()
             if not (k == EMBEDDINGS and model.shares_embeddings)}
    save_weights(directory, state, {"format": "llm-modules eagle3"})
    return directory


def eagle3_record(folder: Path) -> Any:
    """The drafter record (K, loss, targets) beside our folder's description; None for a foreign folder."""
    from llm_modules.models.drafter import DrafterRecord
    from llm_modules.models.saved import DRAFTER_FILE

    path = folder / DRAFTER_FILE
    if not path.is_file():
        return None
    try:
        return DrafterRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise LLMModulesError(f"{path} is not a valid drafter record: {err}") from None


# ---------------------------------------------------------------------------------------------- reading
def _read_config(folder: Path, kind: str, target_layers: int | None) -> tuple[Eagle3Config, int | None]:
    """The network's description from a folder of `kind`, and the K it names (None if it names none)."""
    if kind == "ours":
        return Eagle3Config.load(folder), None
    data = json.loads((folder / "config.json").read_text())
    where = folder / "config.json"
    if kind == "speculators":
        layer = dict(data.get("transformer_layer_config") or {})
        top = data
        taps = data.get("eagle_aux_hidden_state_layer_ids")
        # speculators' own class defaults these to False; vLLM's reader would take True for a missing
        # norm_before_residual: we follow the trainer that wrote the folder
        switches = {k: bool(data.get(k, False)) for k in ("norm_before_residual", "norm_before_fc", "fc_norm",
                                                           "norm_output")}
        methods = (data.get("speculators_config") or {}).get("proposal_methods") or [{}]
        k = methods[0].get("speculative_tokens")
        target = ((data.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path") or ""
    else:
        layer = top = data
        eagle = data.get("eagle_config") or {}
        taps = eagle.get("eagle_aux_hidden_state_layer_ids") or data.get("eagle_aux_hidden_state_layer_ids")
        switches = {"norm_before_residual": bool(data.get("norm_before_residual", False)),
                    "norm_before_fc": bool(eagle.get("norm_before_fc", data.get("norm_before_fc", False))),
                    "fc_norm": bool(data.get("fc_norm", False)), "norm_output": bool(data.get("norm_output", False))}
        k, target = None, ""
    kind_of_layer = layer.get("model_type", "llama")
    if kind_of_layer != "llama":  # vLLM reads qwen3 too (Eagle3Qwen3ForCausalLM: q/k norms this layer lacks)
        raise LLMModulesError(f"{where}: a {kind_of_layer!r} draft layer; this engine runs EAGLE-3's Llama layer only")
    if "sliding_attention" in (layer.get("layer_types") or []):
        raise LLMModulesError(f"{where}: a sliding-window draft layer; this engine runs full attention only")
    if kind == "plain" and (data.get("eagle_config") or {}).get("use_aux_hidden_state") is False:
        raise LLMModulesError(f"{where}: use_aux_hidden_state false is an EAGLE-1/2 drafter (one state, no taps), "
                              "not EAGLE-3")
    if int(layer.get("num_hidden_layers", 1)) != 1:
        raise LLMModulesError(f"{where}: an EAGLE-3 drafter of {layer.get('num_hidden_layers')} layers; this "
                              "engine runs the one-layer layout only")
    if not taps:
        if target_layers is None:
            raise LLMModulesError(f"{where} names no eagle_aux_hidden_state_layer_ids and no target to default them")
        taps = default_taps(target_layers)
    try:
        hidden = int(layer["hidden_size"])
        heads = int(layer["num_attention_heads"])
        rope = layer.get("rope_parameters") or layer.get("rope_scaling") or {}
        rope = {**rope, "rope_theta": float(rope.get("rope_theta", layer.get("rope_theta", 10000.0)))}
        rope.setdefault("rope_type", rope.pop("type", "default"))
        config = Eagle3Config(
            hidden_size=hidden, intermediate_size=int(layer["intermediate_size"]), num_attention_heads=heads,
            num_key_value_heads=int(layer.get("num_key_value_heads") or heads),
            head_dim=int(layer.get("head_dim") or hidden // heads), vocab_size=int(layer["vocab_size"]),
            draft_vocab_size=int(top.get("draft_vocab_size") or layer["vocab_size"]),
            target_hidden_size=int(top.get("target_hidden_size") or hidden), taps=list(taps),
            rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)), rope_parameters=rope,
            max_position_embeddings=int(layer.get("max_position_embeddings", 32768)),
            hidden_act=layer.get("hidden_act", "silu"), attention_bias=bool(layer.get("attention_bias", False)),
            target=target, **switches)
    except KeyError as err:
        raise LLMModulesError(f"{where} lacks {err.args[0]!r}, which an EAGLE-3 layer config needs") from None
    n = layer.get("num_aux_hidden_states")
    if n is not None and int(n) != len(config.taps):
        raise LLMModulesError(f"{where}: num_aux_hidden_states {n} but {len(config.taps)} tap layer ids")
    return config, k


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LLMModulesError(f"{folder} holds no .safetensors weights (pickled checkpoints are not read)")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(load_weights(path))
    renamed = {}
    for name, value in tensors.items():
        name = name.removeprefix("model.").replace("midlayer.", "layers.0.")
        renamed[name] = value
    return renamed


def load_eagle3(folder: str | Path, embeddings: torch.Tensor | None = None, target_layers: int | None = None,
                dtype: torch.dtype = torch.float32, device: Any = None) -> tuple[Eagle3Drafter, int | None]:
    """An EAGLE-3 drafter from `folder` (ours, speculators', or EAGLE's plain layout) -> the network in eval mode
    and the K its folder names (None: none). `embeddings` (Vt, H): the target's input embedding, used when the
    folder holds none (vLLM shares the target's then). `target_layers`: the target's layer count, for a folder
    that names no taps."""
    where = eagle3_folder(folder)
    if where is None:
        raise LLMModulesError(f"{folder} is not an EAGLE-3 drafter folder (no {EAGLE3_FILE}, and no config.json "
                              f"with speculators_model_type eagle3 or architectures {PLAIN_ARCHITECTURES[0]})")
    kind = eagle3_kind(where)
    config, k = _read_config(where, kind, target_layers)
    tensors = _read_tensors(where)
    model = Eagle3Drafter(config)
    expected = model.state_dict()
    if EMBEDDINGS not in tensors:
        if embeddings is None:
            raise LLMModulesError(f"{where} holds no {EMBEDDINGS} and no target embedding was given to share")
        if tuple(embeddings.shape) != tuple(expected[EMBEDDINGS].shape):
            raise LLMModulesError(f"{where} holds no {EMBEDDINGS}, and the target's embedding "
                                  f"{tuple(embeddings.shape)} does not fit the drafter's "
                                  f"{tuple(expected[EMBEDDINGS].shape)}")
        tensors[EMBEDDINGS] = embeddings
        model.shares_embeddings = True
    if "d2t" not in tensors:
        if config.draft_vocab_size != config.vocab_size:
            raise LLMModulesError(f"{where} holds no d2t, but its head has {config.draft_vocab_size} rows for "
                                  f"{config.vocab_size} target tokens: which token each row drafts is unknown")
        tensors["d2t"] = torch.zeros(config.draft_vocab_size, dtype=torch.long)
    if "t2d" not in tensors:
        ids = torch.arange(config.draft_vocab_size) + tensors["d2t"].long()
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        tensors["t2d"] = t2d
    tensors = {k2: v for k2, v in tensors.items() if k2 not in ("verifier_norm.weight", "verifier_lm_head.weight")}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise LLMModulesError(f"{where}: tensors do not match an EAGLE-3 layer of this config (missing {missing[:4]}, "
                              f"unexpected {extra[:4]})")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise LLMModulesError(f"{where}: {name} has shape {tuple(value.shape)}, the config gives "
                                  f"{tuple(expected[name].shape)}")
    model.load_state_dict({n: v.to(expected[n].dtype) for n, v in tensors.items()})
    ids = model.draft_ids
    if bool((ids < 0).any()) or bool((ids >= config.vocab_size).any()):
        raise LLMModulesError(f"{where}: d2t maps draft ids outside the target's vocabulary of {config.vocab_size}")
    model = model.to(dtype=dtype, device=device) if device is not None else model.to(dtype=dtype)
    model.d2t.data, model.t2d.data = model.d2t.long(), model.t2d.bool()
    return model.eval(), k


def shared_embeddings(folder: str | Path) -> torch.Tensor | None:
    """The target's input embedding when the drafter in `folder` shares it (holds no embed_tokens), loaded from
    the target its description names; None when it holds its own."""
    where = eagle3_folder(folder)
    if where is None:
        return None
    from safetensors import safe_open

    for path in where.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            if any(k.endswith(EMBEDDINGS) for k in f.keys()):
                return None
    config, _ = _read_config(where, eagle3_kind(where), None)
    if not config.target:
        raise LLMModulesError(f"{where} holds no {EMBEDDINGS} and names no target to take it from")
    from llm_modules.models.specs import resolve_model

    return resolve_model(config.target).model.get_input_embeddings().weight.detach()


# ---------------------------------------------------------------------------------------------- export
def speculators_config(config: Eagle3Config, draft_tokens: int, verifier: str,
                       verifier_architectures: list[str] | None = None) -> dict[str, Any]:
    """config.json of the speculators format, every switch explicit (module docstring)."""
    layer = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "hidden_act": config.hidden_act, "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": config.rope_parameters, "rope_theta": config.rope_parameters.get("rope_theta"),
        "max_position_embeddings": config.max_position_embeddings, "vocab_size": config.vocab_size,
        "attention_bias": config.attention_bias, "mlp_bias": False, "tie_word_embeddings": False,
        "layer_types": ["full_attention"],
    }
    if len(config.taps) != 3:  # vLLM sizes fc from this key, else 3
        layer["num_aux_hidden_states"] = len(config.taps)
    return {
        "architectures": ["Eagle3DraftModel"], "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "eagle3", "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": draft_tokens,
                                  "accept_tolerance": 0.0, "verifier_accept_k": 1}],
            "verifier": {"name_or_path": verifier, "architectures": verifier_architectures or []},
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": config.draft_vocab_size,
        "eagle_aux_hidden_state_layer_ids": list(config.taps),
        "target_hidden_size": None if config.target_hidden_size == config.hidden_size else config.target_hidden_size,
        "norm_before_residual": config.norm_before_residual, "norm_before_fc": config.norm_before_fc,
        "fc_norm": config.fc_norm, "norm_output": config.norm_output, "embed_requires_grad": False,
        "tie_word_embeddings": False, "dtype": "float32",
    }


def expected_tensors(config: Eagle3Config) -> dict[str, tuple[int, ...]]:
    """The tensors (and shapes) an exported folder must hold: what vLLM's llama_eagle3 loads."""
    h, t, n = config.hidden_size, config.target_hidden_size, len(config.taps)
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    names = {
        EMBEDDINGS: (config.vocab_size, h), "fc.weight": (h, n * t),
        "layers.0.input_layernorm.weight": (h,), "layers.0.hidden_norm.weight": (h,),
        "layers.0.post_attention_layernorm.weight": (h,),
        "layers.0.self_attn.q_proj.weight": (q, 2 * h), "layers.0.self_attn.k_proj.weight": (kv, 2 * h),
        "layers.0.self_attn.v_proj.weight": (kv, 2 * h), "layers.0.self_attn.o_proj.weight": (h, q),
        "layers.0.mlp.gate_proj.weight": (config.intermediate_size, h),
        "layers.0.mlp.up_proj.weight": (config.intermediate_size, h),
        "layers.0.mlp.down_proj.weight": (h, config.intermediate_size),
        "norm.weight": (h,), "lm_head.weight": (config.draft_vocab_size, h),
        "d2t": (config.draft_vocab_size,), "t2d": (config.vocab_size,),
    }
    if config.attention_bias:
        names.update({f"layers.0.self_attn.{p}_proj.bias": (s,) for p, s in (("q", q), ("k", kv), ("v", kv))})
    if config.norm_before_fc:
        names["input_norm.weight"] = (n * t,)
    if config.fc_norm:
        names.update({f"fc_norm.{i}.weight": (t,) for i in range(n)})
    return names


def check_export(folder: str | Path) -> None:
    """Raise unless `folder`'s tensors are exactly the ones (and shapes) its config asks: vLLM would load a
    folder missing one (d2t above all) silently and draft garbage."""
    folder = Path(folder)
    config, _ = _read_config(folder, "speculators", None)
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    want = expected_tensors(config)
    if have != want:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise LLMModulesError(f"{folder}: the exported tensors are not what vLLM loads (missing {missing}, "
                              f"unexpected {extra}, wrong shapes {wrong})")


def export_eagle3(source: str | Path, out: str | Path, draft_tokens: int | None = None, verifier: str | None = None,
                  embeddings: torch.Tensor | None = None) -> Path:
    """Write the EAGLE-3 drafter in `source` to `out` in the speculators format (config.json, model.safetensors:
    every tensor, d2t and t2d included, float32). `verifier`: the target's path or id as the serving machine
    knows it (default: the one the drafter was trained for). `embeddings`: the target's input embedding, for a
    drafter that shares it (ours by default; the exported folder holds it, so it loads without the target)."""
    from safetensors.torch import save_file

    model, named_k = load_eagle3(source, embeddings=embeddings)
    where = eagle3_folder(source)
    record = eagle3_record(where)
    k = draft_tokens or (record.draft_tokens if record else None) or named_k or 3
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LLMModulesError(f"{out} exists and is not empty; export writes a new folder")
    out.mkdir(parents=True, exist_ok=True)
    config = speculators_config(model.config, k, verifier or model.config.target)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    state = {name: (t.float() if t.is_floating_point() else t) for name, t in state.items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):  # none needed by vLLM; kept if the source has them
        if (where / name).is_file():
            shutil.copy(where / name, out / name)
    check_export(out)
    return out
