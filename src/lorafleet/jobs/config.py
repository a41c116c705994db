"""The `lorafleet train` YAML: parsed strictly before anything runs. Every unknown field is named,
and so is every value of the wrong type, with what was expected (one `ConfigError` line). Numbers
may be written as people write them: YAML 1.1 reads `1e-3` (no dot) as a string, so numeric strings
are read as numbers; integers take `1_000` and integral values like `1e3` (see engine/optim.py's
`read_number`); `true` is no number, and nan / inf are refused.

```yaml
base: {debug: qwen3_moe}          # or {path: /local/hf/model_dir}; debug models may set
                                  #   pretrain_steps / sizes (see jobs/base_model.py)
run_dir: runs/quickstart
max_adapters: 4                   # slot pool size; more adapters queue for a free slot
max_rank: 16
max_length: 64                    # tokens per example
overflow: truncate                # or skip (counted in the metrics either way)
seed: 0
checkpoint_every: 50              # global steps between resume checkpoints (0: only at the end)
adapters:
  - name: rev
    data: examples/data/rev_train.jsonl
    eval_data: examples/data/rev_eval.jsonl   # or eval_fraction: 0.1
    rank: 8
    alpha: 16
    target_modules: all-linear
    experts: true
    expert_sharing: none
    optimizer: {lr: 1e-3, schedule: cosine, warmup_steps: 10, grad_clip_norm: 1.0}
    batch_size: 8
    grad_accum: 1
    max_steps: 200                 # or epochs: 2
    eval_every: 50
    save_every: 100                # periodic PEFT export (the final one is always written)
```
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..config import EXPERT_SHARING_MODES, AdapterConfig
from ..engine.optim import OptimConfig
from ..utils.values import coerce_fields, read_number


class ConfigError(ValueError):
    pass


def _take(d: dict, cls, where: str) -> dict:
    """``d`` as fields of ``cls``: a mapping without unknown keys."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(names)}")
    return d


def _typed(d: dict, cls, where: str) -> dict:
    """``d``'s values checked against (and numbers read as) the types of ``cls``'s fields."""
    try:
        return coerce_fields(cls, d)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass
class BaseSpec:
    debug: str | None = None
    path: str | None = None
    pretrain_steps: int | None = None  # debug bases: steps of generic pretraining (cached)
    overrides: dict = field(default_factory=dict)  # debug config overrides (hidden_size, ...)


@dataclass
class AdapterJob:
    name: str
    data: str
    eval_data: str | None = None
    eval_fraction: float | None = None
    rank: int = 8
    alpha: float = 16.0
    target_modules: str | list[str] = "all-linear"
    experts: bool = True
    expert_sharing: str = "none"
    use_rslora: bool = False
    seed: int = 0
    loss: str = "cross_entropy"
    optimizer: dict = field(default_factory=dict)
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float | None = None
    eval_every: int = 0
    eval_batch_size: int = 32
    save_every: int = 0

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(rank=self.rank, alpha=self.alpha, target_modules=self.target_modules,
                             experts=self.experts, expert_sharing=self.expert_sharing,
                             use_rslora=self.use_rslora, seed=self.seed)

    LOSSES = ("cross_entropy",)

    def validate(self, aw: str) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"{aw}: name must be a non-empty string without '/' and not starting with '.'")
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError(f"{aw}: give exactly one of max_steps or epochs")
        if self.max_steps is not None:
            _positive(self.max_steps, f"{aw}: max_steps")
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ConfigError(f"{aw}: epochs must be > 0, got {self.epochs!r}")
        for k in ("batch_size", "grad_accum", "eval_batch_size"):
            _positive(getattr(self, k), f"{aw}: {k}")
        for k in ("eval_every", "save_every"):
            _positive(getattr(self, k), f"{aw}: {k}", allow_zero=True)
        if self.eval_data is not None and self.eval_fraction is not None:
            raise ConfigError(f"{aw}: give at most one of eval_data or eval_fraction")
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise ConfigError(f"{aw}: eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        tm = self.target_modules
        if not (isinstance(tm, str) or (isinstance(tm, (list, tuple)) and all(isinstance(t, str) for t in tm))):
            raise ConfigError(f"{aw}: target_modules: expected 'all-linear' or a list of module names, got {tm!r}")
        if self.expert_sharing not in EXPERT_SHARING_MODES:
            raise ConfigError(f"{aw}: expert_sharing must be one of {EXPERT_SHARING_MODES}")
        if self.loss not in self.LOSSES:
            raise ConfigError(f"{aw}: loss must be one of {self.LOSSES} here (got {self.loss!r})")
        try:
            self.adapter_config()
            optim = self.optim_config(self.max_steps or 1)
        except ValueError as e:
            raise ConfigError(f"{aw}: {e}") from None
        # kept read ("1e-3" -> 0.001), so what is recorded (a service job's spec) shows numbers
        self.optimizer = {k: list(v) if k == "betas" else v for k, v in
                          ((k, getattr(optim, k)) for k in self.optimizer)}

    def optim_config(self, steps: int) -> OptimConfig:
        opt = dict(self.optimizer)
        if opt.get("schedule", "constant") != "constant":
            opt.setdefault("total_steps", steps)
        return OptimConfig.from_dict(opt)


@dataclass
class TrainConfig:
    base: BaseSpec
    adapters: list[AdapterJob]
    run_dir: str = "runs/train"
    max_adapters: int = 4
    max_rank: int = 16
    max_length: int = 128
    overflow: str = "truncate"
    seed: int = 0
    checkpoint_every: int = 50
    logprob_chunk: int = 1024
    # torchrun runs: {data_parallel_replicate_degree, data_parallel_shard_degree,
    # expert_parallel_degree, timeout_s} (lorafleet.distributed.ParallelismConfig; -1 = the rest
    # of the world). Not part of the resume hash: a run may resume on another world size.
    parallelism: dict | None = None
    source: str = ""  # the YAML file this came from (paths in it are relative to it)

    def resolve(self, p: str | None) -> Path | None:
        if p is None:
            return None
        q = Path(p)
        return q if q.is_absolute() or not self.source else (Path(self.source).parent / q)


@dataclass
class RLConfig(TrainConfig):
    """`lorafleet rl`'s YAML: a train config plus an optional ``rollout:`` engine (absent: the
    built-in sampler). The mapping is kept as read (`read_rollout`); jobs/rollout_engine.py uses it."""

    rollout: dict | None = None


ROLLOUT_ENGINES = ("vllm", "vllm-local", "vllm-inprocess", "sglang")  # vllm / sglang: a running server at url
# the rollout keys the job itself reads; every other key is the engine's own option (make_engine)
ROLLOUT_JOB_KEYS = {"engine": str, "url": str, "async": bool, "max_staleness": int, "retries": int,
                    "retry_wait_s": float}
ROLLOUT_DEFAULTS = {"async": False, "max_staleness": 1, "retries": 3, "retry_wait_s": 1.0}


def read_rollout(spec, where: str) -> dict:
    """The ``rollout:`` mapping checked and completed with its defaults; one-line ConfigError
    naming the field. Engine options beyond ROLLOUT_JOB_KEYS pass through to the engine, which
    checks them when the job starts."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{engine: vllm, url: http://127.0.0.1:8000}}, "
                          f"got {spec!r}")
    out = {**ROLLOUT_DEFAULTS, **spec}
    for key, kind in ROLLOUT_JOB_KEYS.items():
        if key in out and out[key] is not None:
            try:
                out[key] = _coerce_one(kind, out[key], f"{where}.{key}")
            except ValueError as e:
                raise ConfigError(str(e)) from None
    engine = out.get("engine")
    if engine not in ROLLOUT_ENGINES:
        raise ConfigError(f"{where}.engine: must be one of {list(ROLLOUT_ENGINES)}, got {engine!r}")
    url = out.get("url")
    if engine in ("vllm-local", "vllm-inprocess"):
        if url is not None:
            raise ConfigError(f"{where}.url: engine {engine} starts its own engine on the base model's "
                              "directory and takes no url (use engine: vllm for a running server)")
    elif not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise ConfigError(f"{where}.url: engine {engine} needs the server's url (http://host:port), got {url!r}")
    else:
        out["url"] = url.rstrip("/")
    _positive(out["max_staleness"], f"{where}.max_staleness")
    _positive(out["retries"], f"{where}.retries", allow_zero=True)
    if out["retry_wait_s"] < 0:
        raise ConfigError(f"{where}.retry_wait_s must be >= 0, got {out['retry_wait_s']!r}")
    if "max_staleness" in spec and not out["async"]:
        raise ConfigError(f"{where}.max_staleness: only meaningful with async: true")
    if out["async"]:  # S versions may be in flight while the next loads: versioned names, S+1 kept
        need = out["max_staleness"] + 1
        kept = out.setdefault("max_versions", need)
        if isinstance(kept, bool) or not isinstance(kept, int) or kept < need:
            raise ConfigError(f"{where}.max_versions: async rollouts with max_staleness {out['max_staleness']} "
                              f"need max_versions >= {need} (max_staleness + 1), got {kept!r}")
    return out


def _coerce_one(kind, value, what):
    if kind in (int, float):
        return read_number(value, kind, what)
    if not isinstance(value, kind):
        expected = {bool: "true or false", str: "a string"}[kind]
        raise ValueError(f"{what}: expected {expected}, got {value!r}")
    return value


def _positive(v, where, allow_zero=False):
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
        raise ConfigError(f"{where} must be an integer >= {0 if allow_zero else 1}, got {v!r}")


def read_adapter_job(d: dict, where: str, adapter_cls=None) -> AdapterJob:
    """One adapter's mapping (of a train config, or a service job) as its validated job;
    errors name it as ``where (name)``."""
    adapter_cls = adapter_cls or AdapterJob
    _take(d, adapter_cls, where)
    if "name" not in d or "data" not in d:
        raise ConfigError(f"{where}: needs 'name' and 'data'")
    if isinstance(d["name"], str):
        where = f"{where} ({d['name']})"
    job = adapter_cls(**_typed(d, adapter_cls, where))
    job.validate(where)
    return job


def parse_config(data: dict, source: str = "", adapter_cls=None, config_cls=None) -> TrainConfig:
    config_cls = config_cls or TrainConfig
    where = source or "config"
    _take(data, config_cls, where)
    if "base" not in data or "adapters" not in data:
        raise ConfigError(f"{where}: needs 'base' and 'adapters'")
    if "source" in data:  # set by the loader, not by the file
        raise ConfigError(f"{where}: unknown field(s) ['source']")
    bw = f"{where}: base"
    base = BaseSpec(**_typed(_take(data["base"], BaseSpec, bw), BaseSpec, bw))
    if (base.debug is None) == (base.path is None):
        raise ConfigError(f"{where}: base needs exactly one of 'debug' (a built-in model name) or 'path'")
    raw = data["adapters"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: 'adapters' must be a non-empty list")
    jobs, seen = [], set()
    for i, a in enumerate(raw):
        job = read_adapter_job(a, f"{where}: adapters[{i}]", adapter_cls)
        if job.name in seen:
            raise ConfigError(f"{where}: adapter name {job.name!r} appears twice")
        seen.add(job.name)
        jobs.append(job)
    rest = _typed({k: v for k, v in data.items() if k not in ("base", "adapters")}, config_cls, where)
    cfg = config_cls(base=base, adapters=jobs, source=source, **rest)
    for k in ("max_adapters", "max_rank", "max_length"):
        _positive(getattr(cfg, k), f"{where}: {k}")
    _positive(cfg.checkpoint_every, f"{where}: checkpoint_every", allow_zero=True)
    if cfg.overflow not in ("truncate", "skip"):
        raise ConfigError(f"{where}: overflow must be 'truncate' or 'skip', got {cfg.overflow!r}")
    _check_parallelism(cfg.parallelism, where)
    if getattr(cfg, "rollout", None) is not None:
        cfg.rollout = read_rollout(cfg.rollout, f"{where}: rollout")
        if cfg.parallelism is not None:
            raise ConfigError(f"{where}: rollout: a rollout engine does not run with parallelism: yet "
                              "(one process only)")
    for job in jobs:
        if job.rank > cfg.max_rank:
            raise ConfigError(f"{where}: adapter {job.name!r} has rank {job.rank} above max_rank {cfg.max_rank}")
        for key in ("data", "eval_data"):
            p = cfg.resolve(getattr(job, key))
            if p is not None and not p.is_file():
                raise ConfigError(f"{where}: adapter {job.name!r}: {key} file {str(p)!r} does not exist")
    return cfg


def _check_parallelism(spec, where) -> None:
    """The degrees' own rules now; the world size is checked at launch (distributed/jobs.py)."""
    if spec is None:
        return
    from ..distributed.mesh import ParallelismConfig

    try:
        ParallelismConfig.from_dict(spec)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_yaml_mapping(path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping (ConfigError naming the problem otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(path, adapter_cls=None, config_cls=None) -> TrainConfig:
    return parse_config(read_yaml_mapping(path), str(path), adapter_cls, config_cls)
