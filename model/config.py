"""Every setting of a training run, defined once. Pure Python: no torch, no Prefect, so the
pipeline can describe a run (and the CLI list the model sizes) without loading torch.

- `PRESETS`: the model sizes by name (the vocabulary comes from the data).
- `TrainConfig`: the training settings with their defaults. Each field's metadata holds its
  help text and bounds (`ge`, `gt`, `le`, `lt`, as in pydantic); `Literal` types list the
  allowed values. From this one class come the trainer's command line (`python -m
  model.train --max-steps 5`, or all of them at once with `--config JSON`) and the `pretrain`
  stage's parameter model (tasks/pretrain.py: `stage pretrain --set lr=3e-4`, the pipeline's
  `--set pretrain.lr=3e-4`, the Prefect UI form).

Anchors: torchtitan's JobConfig (one typed dataclass that is also the command line) and
nanoGPT's train.py (a flat list of the settings at the top of the script).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

# Model sizes by name; the vocabulary size comes from the data (the tokenizer).
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, seq_len=512),            # ~0.8M + vocab: CPU, minutes; the
    # context holds a system prompt, a few turns and a passage (chat); pretraining may use less (--seq-len)
    "mini": dict(n_layer=6, n_head=8, n_embd=256, seq_len=256),            # ~4.7M + vocab: CPU benchmark
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024),   # 124M with GPT-2's vocab
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, seq_len=1024),  # 350M with GPT-2's vocab
    "1b": dict(n_layer=20, n_head=16, n_embd=2048, seq_len=2048),          # 1.0B + vocab
}
Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]  # the names, as a type: a dropdown in forms

DEFAULT_PROMPTS = ["The ", "In the beginning", "Python is"]
BOUNDS = ("ge", "gt", "le", "lt")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, flag: str | None = None,
            **bounds: float) -> Any:
    """A TrainConfig field: its default (or a `factory` for a mutable one), help text, bounds
    and, where it differs from the field name, the trainer's command-line flag."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}")
    metadata = {"help": help, **bounds, **({"flag": flag} if flag else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """The settings of a training run: what shapes the weights, and how the run reports."""

    # -- the model
    preset: Preset = setting("tiny", "model size (model/config.py PRESETS)")
    vocab_size: int | None = setting(None, "model vocabulary (default: the shards' vocab_size); "
                                           "may pad above it, never below", ge=1)
    seq_len: int | None = setting(None, "training context in tokens (default: the preset's)", ge=8)
    dropout: float = setting(0.0, "dropout probability", ge=0, lt=1)
    # -- steps and batches
    max_steps: int = setting(200, "optimizer steps", ge=1)
    batch_size: int = setting(8, "micro-batch per rank (sequences)", ge=1)
    tokens_per_step: int | None = setting(None, "tokens per optimizer step over all ranks; gradient accumulation "
                                                "reaches it (default: batch_size x seq_len x ranks)", ge=1)
    # -- optimizer (AdamW) and learning-rate schedule
    lr: float = setting(6e-4, "peak learning rate", gt=0)
    warmup_steps: int = setting(20, "steps of linear warmup", ge=0)
    schedule: Literal["cosine", "wsd"] = setting("cosine", "after warmup: cosine decay, or warmup-stable-decay")
    min_lr_ratio: float = setting(0.1, "the final learning rate as a share of lr", ge=0, le=1)
    decay_fraction: float = setting(0.2, "wsd: share of the steps spent decaying", ge=0, le=1)
    weight_decay: float = setting(0.1, "weight decay of the weight matrices", ge=0)
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 disables clipping", ge=0)
    # -- evaluation on the val split
    eval_every: int = setting(50, "steps between evaluations (and at the end); 0 disables evaluation", ge=0)
    eval_steps: int = setting(10, "batches per evaluation", ge=1)
    bytes_per_token: float | None = setting(None, "for bits per byte (default: meta.json's bytes_per_token, "
                                                  "if any)", gt=0)
    # -- samples
    sample_every: int = setting(100, "steps between samples (and at the end); 0 disables sampling", ge=0)
    prompts: list[str] = setting(factory=lambda: list(DEFAULT_PROMPTS), help="sampling prompts",
                                 flag="prompt")
    sample_tokens: int = setting(64, "tokens per sample", ge=1)
    temperature: float = setting(0.8, "sampling temperature; 0 is greedy", ge=0)
    top_k: int = setting(50, "sample from the k likeliest tokens; 0: from all", ge=0)
    # -- checkpoints and stopping
    checkpoint_every: int = setting(100, "steps between checkpoints; 0: only at the end; -1: never", ge=-1)
    keep_checkpoints: int = setting(2, "complete checkpoints to keep", ge=1)
    time_limit: float | None = setting(None, "stop (checkpoint, final weights) after the step that passes "
                                             "this many seconds", gt=0)
    # -- how it computes
    seed: int = setting(1337, "seed of the initial weights and of dropout", ge=0)
    dtype: Literal["auto", "bf16", "fp32"] = setting("auto", "auto: bf16 autocast on CUDA, fp32 on CPU "
                                                             "(bf16 applies on CUDA only)")
    compile: bool = setting(False, "torch.compile the model")
    fsdp: bool = setting(False, "shard parameters with FSDP2 (fully_shard)")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass")

    def __post_init__(self) -> None:
        problems = [p for s in settings() if (p := s.problem(getattr(self, s.name)))]
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from (a subset of) its fields; unknown names and bad values are a ValueError."""
        unknown = sorted(set(values) - {s.name for s in settings()})
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**values)


# --------------------------------------------------------------------------------------
# The fields, described: what the command line and the stage's parameter model are built from
# --------------------------------------------------------------------------------------

class Setting(NamedTuple):
    name: str
    type: Any                 # the resolved annotation, e.g. int | None, Literal["cosine", "wsd"]
    default: Any              # dataclasses.MISSING when `factory` gives it
    factory: Any              # None, or a function making the default
    help: str
    bounds: dict[str, float]  # of ge, gt, le, lt
    flag: str                 # the trainer's command-line flag

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.type)

    @property
    def base(self) -> Any:
        """The type without None: int, float, str, bool, a Literal or list[str]."""
        args = [a for a in typing.get_args(self.type) if a is not type(None)]
        if typing.get_origin(self.type) in (typing.Union, types.UnionType) and len(args) == 1:
            return args[0]
        return self.type

    @property
    def choices(self) -> tuple | None:
        return typing.get_args(self.base) if typing.get_origin(self.base) is Literal else None

    def default_value(self) -> Any:
        return self.factory() if self.factory is not None else self.default

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this setting, in a few words, or None."""
        name = self.name
        if value is None:
            return None if self.optional else f"{name} must be set"
        base, choices = self.base, self.choices
        if choices is not None:
            return None if value in choices else f"{name} must be one of {', '.join(map(str, choices))}, not {value!r}"
        if typing.get_origin(base) is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            return None if ok else f"{name} must be a list of strings, not {value!r}"
        if base is bool:
            return None if isinstance(value, bool) else f"{name} must be true or false, not {value!r}"
        if base is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{name} must be an integer, not {value!r}"
        if base is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{name} must be a number, not {value!r}"
        for bound, limit in self.bounds.items():
            ok = {"ge": value >= limit, "gt": value > limit, "le": value <= limit, "lt": value < limit}[bound]
            if not ok:
                sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[bound]
                return f"{name} must be {sign} {limit:g}, not {value!r}"
        return None


def settings(cls: type = TrainConfig) -> list[Setting]:
    """The fields of a settings dataclass, in order, with their resolved types and metadata."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        out.append(Setting(f.name, hints[f.name], f.default,
                           None if f.default_factory is dataclasses.MISSING else f.default_factory,
                           m.get("help", ""), {k: m[k] for k in BOUNDS if k in m},
                           "--" + m.get("flag", f.name).replace("_", "-")))
    return out


# --------------------------------------------------------------------------------------
# The command line, generated
# --------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """One flag per setting (a list setting: a repeatable flag; a bool: --x / --no-x), plus
    --config JSON for all of them at once. No defaults land in the namespace: `from_args`
    takes them from the dataclass, so a flag never given cannot override --config."""
    group = parser.add_argument_group("training settings (model/config.py TrainConfig)")
    group.add_argument("--config", metavar="JSON", default=argparse.SUPPRESS,
                       help="settings as one JSON object (or a path to a .json file); flags override it")
    for s in settings(cls):
        shown = "" if "(default:" in s.help else f" (default: {_shown(s.default_value())})"
        kw: dict[str, Any] = {"dest": s.name, "default": argparse.SUPPRESS, "help": (s.help + shown).replace("%", "%%")}
        if s.base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(s.base) is list:
            kw.update(action="append", type=typing.get_args(s.base)[0], metavar=s.name.rstrip("s").upper(),
                      help=f"{s.help}, repeatable{shown}".replace("%", "%%"))
        elif s.choices is not None:
            kw.update(choices=list(s.choices), type=type(s.choices[0]))
        else:
            kw.update(type=s.base, metavar="N" if s.base is int else "X" if s.base is float else "TEXT")
        group.add_argument(s.flag, **kw)


def from_args(ns: argparse.Namespace, cls: type = TrainConfig) -> Any:
    """The config of a namespace parsed with `add_arguments`: defaults, then --config, then flags.
    Raises ValueError naming what is wrong."""
    values: dict = {}
    if getattr(ns, "config", None):
        values.update(_read_config(ns.config))
    values.update({s.name: getattr(ns, s.name) for s in settings(cls) if hasattr(ns, s.name)})
    return cls.from_dict(values)


def _read_config(text: str) -> dict:
    source = "--config"
    if not text.lstrip().startswith("{"):
        import fsspec

        source = text
        try:
            with fsspec.open(text, "rt") as f:
                text = f.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise ValueError(f"cannot read --config {source}: {e}") from None
    try:
        values = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{source} must be a JSON object of settings")
    return values


def _shown(value: Any) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, (list, str)) else str(value)
