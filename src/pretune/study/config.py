"""The study config: `pretune study STUDY.yaml [KEY=VALUE ...]`.

A study crosses tasks x arms x labelled-set sizes x seeds. An arm is a strategy, named by a small
grammar so that the common ones need no configuration:

    scratch                       the same architecture trained on the task data alone
    [cpt+]METHOD[+replay][+l2sp]  METHOD is full, freeze (last layers), lora, zero-shot or few-shot;
                                  cpt+ starts from the continued-pre-trained model instead of the base

or spelt out as a mapping (`{name: my-arm, init: cpt, method: lora, replay: true, config: {...}}`).
Every fine-tuning run of the study is an ordinary `Config`, built from the study's `finetune`
mapping, the task's `config`, the arm's and the budget; `load_study` builds one per task and arm up
front, so a wrong key anywhere is reported (with its place in the study file) before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from pretune.config import TASKS, MeterConfig, TrackConfig, load_config
from pretune.config_io import deep_merge, from_dict, parse_overrides, read_yaml
from pretune.errors import ConfigError

METHODS = ("full", "freeze", "lora", "zero-shot", "few-shot")
MODIFIERS = ("replay", "l2sp")
DEFAULT_METRIC = {"classification": "accuracy", "instruction": "chrf", "text2text": "rouge_l",
                  "preference": "pref_accuracy"}
# Metrics a task type reports on its test set (the primary one must be among them).
TASK_METRICS = {"classification": ("accuracy", "macro_f1"),
                "instruction": ("chrf", "exact_match"),
                "text2text": ("rouge_l", "rouge_1", "rouge_2", "chrf", "exact_match"),
                "preference": ("pref_accuracy",)}


@dataclass
class BaseSpec:
    """The pre-trained model every non-scratch arm starts from: give `run` or `pretrain`."""

    run: str | None = None
    """An existing pretune run or model directory, or an imported Hugging Face model directory."""
    pretrain: dict | None = None
    """A pre-training run the study does first (a mapping of `pretune pretrain` keys), into OUT_DIR/base."""


@dataclass
class CPTSpec:
    """Continued pre-training of the base on domain text, done once for every cpt+ arm."""

    data: list[str] = field(default_factory=list)
    """Domain text (files, globs or directories)."""
    replay_ratio: float = 0.25
    """Share of the study's general `replay` text mixed into continued pre-training."""
    steps: int = 200
    """Optimiser steps of continued pre-training."""
    config: dict = field(default_factory=dict)
    """More `pretune pretrain` keys for this stage (optim.lr, train.batch_size, ...)."""


@dataclass
class TaskSpec:
    """One labelled task: records in JSONL, CSV or TSV, as `pretune finetune` reads them."""

    task: str = "classification"
    """classification, instruction or text2text."""
    train: list[str] = field(default_factory=list)
    """Training records; labelled subsets of each size are drawn from them per seed."""
    val: list[str] = field(default_factory=list)
    """Validation records (early stopping); empty takes data.val_fraction of train."""
    test: list[str] = field(default_factory=list)
    """Test records: every score in the report is measured on them."""
    metric: str | None = None
    """Primary metric (higher is better); None: accuracy, chrf or rouge_l by task type."""
    target: float | None = None
    """The score that would be good enough; the recommendation looks for the cheapest arm reaching it."""
    sizes: list[int | str] | None = None
    """Labelled-set sizes for this task; None uses the study's `sizes`."""
    config: dict = field(default_factory=dict)
    """More `pretune finetune` keys for this task (data.text_field, finetune.max_len, ...)."""


@dataclass
class BudgetSpec:
    """The same training budget for every arm at a given size."""

    epochs: float = 10.0
    """Passes over the labelled set ..."""
    min_steps: int = 20
    """... but at least this many optimiser steps (small sets still train) ..."""
    max_steps: int = 300
    """... and at most this many."""
    patience: int | None = None
    """Early stopping on the validation score after this many evaluations without improvement."""
    eval_every: int = 10
    """Steps between validation evaluations when `patience` is set."""

    def steps(self, n_examples: int, batch_size: int) -> int:
        per_epoch = -(-n_examples // batch_size)
        return max(self.min_steps, min(self.max_steps, round(self.epochs * per_epoch)))


@dataclass
class StudyConfig:
    """`pretune study STUDY.yaml [KEY=VALUE ...]`."""

    name: str = "study"
    """Name shown in the report."""
    out_dir: str = "runs/study"
    """The study directory: shared stages, one run directory per arm, size and seed, the report."""
    base: BaseSpec = field(default_factory=BaseSpec)
    cpt: CPTSpec = field(default_factory=CPTSpec)
    tasks: dict = field(default_factory=dict)
    """Task name -> task spec (task, train, val, test, metric, target, sizes, config)."""
    arms: list = field(default_factory=lambda: ["scratch", "full", "freeze", "lora"])
    """Strategies to compare: names of the arm grammar or mappings."""
    sizes: list[int | str] = field(default_factory=lambda: [16, 64, 256, "all"])
    """Labelled-set sizes (data efficiency); 'all' is the whole training set."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds: each draws its own labelled subset, initialisation and data order."""
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    finetune: dict = field(default_factory=dict)
    """`pretune finetune` keys for every run (train.batch_size, optim.lr, finetune.classifier, ...)."""
    arm_config: dict = field(default_factory=dict)
    """Per arm name or per method (full, freeze, lora, scratch): more `pretune finetune` keys."""
    replay: list[str] = field(default_factory=list)
    """General text replayed by +replay arms and by continued pre-training."""
    replay_ratio: float = 0.25
    """Share of replayed general text in the tokens of a +replay fine-tuning run."""
    l2sp: float = 0.01
    """Strength of the penalty toward the starting weights in +l2sp arms."""
    shots: int = 4
    """Demonstrations in the prompt of few-shot arms (at most the labelled-set size)."""
    general_eval: list[str] = field(default_factory=list)
    """Held-out general text: bits per byte before and after fine-tuning measure forgetting."""
    eval_tokens: int = 20000
    """Tokens of general_eval to score per model."""
    bias_pairs: str | None = None
    """CSV of minimal pairs (sent_more, sent_less[, bias_type]) in the style of CrowS-Pairs."""
    bias_max_pairs: int = 2000
    """Score at most this many pairs."""
    engine: str = "local"
    """'local' (this machine) or 'ray' (a Ray cluster; needs pretune[ray])."""
    parallel: int = 1
    """Runs at once: processes on this machine (one GPU each when there are GPUs), or Ray workers."""
    ray_address: str | None = None
    """Address of a running Ray cluster; None starts a local one."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda' for every run."""
    threads: int | None = None
    """CPU threads per run; None divides the cores among the parallel runs."""
    stats_seed: int = 0
    """Seed of the bootstrap resampling in the report's statistics (changes the intervals a little)."""
    track: TrackConfig = field(default_factory=TrackConfig)
    meter: MeterConfig = field(default_factory=MeterConfig)

    def problems(self) -> list[str]:
        p = []
        if not self.tasks:
            p.append("tasks: give at least one task (name: {task, train, test, ...})")
        if bool(self.base.run) == bool(self.base.pretrain):
            p.append("base: give exactly one of base.run (an existing model) or base.pretrain (a "
                     "pre-training run for the study to do)")
        if not self.seeds:
            p.append("seeds: give at least one seed")
        if not self.sizes:
            p.append("sizes: give at least one labelled-set size")
        p += size_problems("sizes", self.sizes)
        if len(set(self.seeds)) != len(self.seeds):
            p.append(f"seeds={self.seeds}: a seed is listed twice (its runs would be the same)")
        if self.shots < 0:
            p.append(f"shots={self.shots}: give 0 or more demonstrations")
        if self.l2sp < 0:
            p.append(f"l2sp={self.l2sp} must be >= 0")
        if self.eval_tokens < 1 or self.bias_max_pairs < 1:
            p.append("eval_tokens and bias_max_pairs must be >= 1")
        if self.engine not in ("local", "ray"):
            p.append(f"engine={self.engine!r} is not one of local, ray")
        if self.parallel < 1:
            p.append(f"parallel={self.parallel} must be >= 1")
        if not 0 <= self.replay_ratio < 1 or not 0 <= self.cpt.replay_ratio < 1:
            p.append("replay_ratio and cpt.replay_ratio must be in [0, 1)")
        b = self.budget
        if b.min_steps < 1 or b.max_steps < b.min_steps or b.epochs <= 0:
            p.append(f"budget: need epochs > 0 and 1 <= min_steps <= max_steps (got epochs={b.epochs}, "
                     f"min_steps={b.min_steps}, max_steps={b.max_steps})")
        if b.patience is not None and (b.patience < 1 or b.eval_every < 1):
            p.append(f"budget: patience={b.patience} and eval_every={b.eval_every} must be >= 1 (patience: the "
                     "evaluations without improvement after which a run stops; leave it unset for no early stopping)")
        return p


@dataclass
class Arm:
    """One strategy of the study."""

    name: str
    init: str = "base"
    """'base', 'cpt' (the continued-pre-trained model) or 'scratch' (random weights)."""
    method: str = "full"
    """full, freeze, lora, or none (prompting only: zero-shot or few-shot)."""
    replay: bool = False
    """Mix general text into fine-tuning."""
    l2sp: bool = False
    """Penalise distance from the starting weights."""
    shots: int | None = None
    """Prompting arms: demonstrations in the prompt (0 for zero-shot)."""
    config: dict = field(default_factory=dict)
    """More `pretune finetune` keys for this arm."""

    @property
    def trains(self) -> bool:
        return self.method != "none"

    def describe(self) -> str:
        if self.init == "scratch":
            return "the base architecture trained from random weights on the task data alone"
        start = "the continued-pre-trained model" if self.init == "cpt" else "the pre-trained base"
        if not self.trains:
            return f"{start}, prompted with {self.shots} demonstration(s), no training" if self.shots else \
                f"{start}, prompted zero-shot, no training"
        what = {"full": "all weights", "freeze": "the last layers only", "lora": "LoRA adapters"}[self.method]
        extras = [x for x, on in (("general-text replay", self.replay), ("L2-SP toward the start", self.l2sp)) if on]
        return f"{start}, fine-tuning {what}" + (" with " + " and ".join(extras) if extras else "")


def size_problems(key: str, sizes: list) -> list[str]:
    """Labelled-set sizes: positive integers or 'all', none twice."""
    p = [f"{key}[{i}]={s!r}: a size is a positive number of examples or 'all'" for i, s in enumerate(sizes)
         if not (s == "all" or isinstance(s, int) and not isinstance(s, bool) and s > 0)]
    if not p and len(set(map(str, sizes))) != len(sizes):
        p.append(f"{key}={sizes}: a size is listed twice (its runs would be the same)")
    return p


def path_problems(key: str, specs: list[str] | str | None) -> list[str]:
    """Files, globs or directories that are not there, each named with its key."""
    from pretune.data.sources import DataError, expand_source

    out = []
    for i, spec in enumerate([specs] if isinstance(specs, str) else list(specs or [])):
        try:
            expand_source(str(spec), key if isinstance(specs, str) else f"{key}[{i}]")
        except DataError as e:
            out.append(str(e))
    return out


def _suggest(word: str, options: tuple[str, ...] | list[str]) -> str:
    hint = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(options)}"


def parse_arm_name(name: str) -> Arm:
    """`cpt+lora+replay` -> Arm(init='cpt', method='lora', replay=True); ConfigError names a bad part."""
    parts = [p.strip() for p in str(name).split("+")]
    if parts == ["scratch"]:
        return Arm(name, init="scratch")
    init = "base"
    if parts[0] == "cpt":
        init, parts = "cpt", parts[1:]
    if not parts or parts[0] not in METHODS:
        got = parts[0] if parts else ""
        raise ConfigError(f"arm {name!r}: {got!r} is not a method" + _suggest(got, ("scratch", "cpt") + METHODS))
    method, mods = parts[0], parts[1:]
    for m in mods:
        if m not in MODIFIERS:
            raise ConfigError(f"arm {name!r}: unknown part {m!r}" + _suggest(m, MODIFIERS))
    prompting = method in ("zero-shot", "few-shot")
    if prompting and mods:
        raise ConfigError(f"arm {name!r}: {method} trains nothing, so +{mods[0]} does not apply")
    return Arm(name, init=init, method="none" if prompting else method, replay="replay" in mods,
               l2sp="l2sp" in mods, shots=None if not prompting else (0 if method == "zero-shot" else -1))


def parse_arm(spec, default_shots: int) -> Arm:
    if isinstance(spec, str):
        arm = parse_arm_name(spec)
    elif isinstance(spec, dict):
        if "name" not in spec:
            raise ConfigError(f"arm {spec}: a spelt-out arm needs a name")
        problems: list[str] = []
        arm = from_dict(Arm, spec, f"arm {spec['name']}: ", problems)
        if problems:
            raise ConfigError(problems)
        if arm.init not in ("base", "cpt", "scratch"):
            raise ConfigError(f"arm {arm.name}: init={arm.init!r} is not one of base, cpt, scratch")
        if arm.method not in ("full", "freeze", "lora", "none"):
            raise ConfigError(f"arm {arm.name}: method={arm.method!r} is not one of full, freeze, lora, none")
        if arm.method == "none" and arm.shots is None:
            arm.shots = 0
        if arm.method == "none" and arm.init == "scratch":
            raise ConfigError(f"arm {arm.name}: prompting (method none) needs a trained model; use init base or cpt")
        if arm.shots is not None and arm.shots < -1:
            raise ConfigError(f"arm {arm.name}: shots={arm.shots}: give 0 or more demonstrations")
    else:
        raise ConfigError(f"arm {spec!r}: give a name such as 'cpt+lora' or a mapping")
    if arm.shots == -1:
        arm.shots = default_shots
    return arm


def parse_task(name: str, spec, problems: list[str]) -> TaskSpec | None:
    if not isinstance(spec, dict):
        problems.append(f"tasks.{name}: expected a mapping (task, train, test, ...), got {spec!r}")
        return None
    t = from_dict(TaskSpec, spec, f"tasks.{name}.", problems)
    if t is None:
        return None
    if t.task not in TASKS or t.task == "preference":
        problems.append(f"tasks.{name}.task={t.task!r} is not one of classification, instruction, text2text")
        return t
    t.metric = t.metric or DEFAULT_METRIC[t.task]
    if t.metric not in TASK_METRICS[t.task]:
        problems.append(f"tasks.{name}.metric={t.metric!r} is not reported for {t.task}; one of "
                        f"{', '.join(TASK_METRICS[t.task])}")
    if not t.train or not (t.test or (t.config.get("data") or {}).get("test_fraction")):
        problems.append(f"tasks.{name}: needs train and test records (files, globs or directories), or "
                        f"tasks.{name}.config.data.test_fraction to hold out part of train as the test set")
    for split in ("train", "val", "test"):
        problems += path_problems(f"tasks.{name}.{split}", getattr(t, split))
    if t.sizes is not None:
        problems += size_problems(f"tasks.{name}.sizes", t.sizes)
    return t


@dataclass
class Study:
    """A loaded, validated study."""

    cfg: StudyConfig
    tasks: dict[str, TaskSpec]
    arms: list[Arm]
    raw: dict
    """The merged YAML + overrides, as written to OUT_DIR/study.yaml."""

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    @property
    def needs_cpt(self) -> bool:
        return any(a.init == "cpt" for a in self.arms)


def load_study(path: str | None, overrides: list[str] | None = None, base: dict | None = None) -> Study:
    """Read, merge and check a study; every problem is reported at once."""
    raw = deep_merge(dict(base or {}), read_yaml(path) if path else {})
    raw = deep_merge(raw, parse_overrides(overrides or [], StudyConfig))  # read by each key's type
    cfg = load_config(StudyConfig, None, None, base=raw)
    problems: list[str] = []
    tasks = {}
    parsed = {}  # the tasks without problems of their own: their runs' configs are checked below
    for name, spec in cfg.tasks.items():
        before = len(problems)
        t = parse_task(str(name), spec, problems)
        if t is not None:
            tasks[str(name)] = t
            if len(problems) == before:
                parsed[str(name)] = t
    arms = []
    for spec in cfg.arms:
        try:
            arms.append(parse_arm(spec, cfg.shots))
        except ConfigError as e:
            problems += e.problems
    names = [a.name for a in arms]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"arms: {dup!r} is listed twice")
    if not arms:
        problems.append("arms: give at least one arm, for example [scratch, full, lora]")
    if any(a.init == "cpt" for a in arms) and not cfg.cpt.data:
        problems.append("a cpt+ arm needs cpt.data (domain text for continued pre-training)")
    if any(a.replay for a in arms) and not cfg.replay:
        problems.append("a +replay arm needs replay (general text files)")
    if cfg.cpt.replay_ratio > 0 and cfg.cpt.data and not cfg.replay:
        problems.append("cpt.replay_ratio > 0 needs replay (general text files); or set cpt.replay_ratio=0")
    # every file the study reads is checked now, not after the base has been pre-trained
    problems += path_problems("general_eval", cfg.general_eval) + path_problems("bias_pairs", cfg.bias_pairs)
    problems += path_problems("replay", cfg.replay) + path_problems("cpt.data", cfg.cpt.data)
    unknown = set(cfg.arm_config) - set(names) - {"full", "freeze", "lora", "scratch", "prompting"}
    for key in sorted(unknown):
        problems.append(f"arm_config.{key}: not an arm of this study nor a method"
                        + _suggest(key, names + ["full", "freeze", "lora", "scratch", "prompting"]))
    study = Study(cfg, tasks, arms, raw)
    if arms:  # every run's config, built now with placeholder paths for the models not yet made
        from pretune.study.jobs import run_config_problems

        problems += run_config_problems(dataclasses.replace(study, tasks=parsed))
    if problems:
        raise ConfigError(problems)
    return study
