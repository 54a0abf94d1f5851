"""Typed run arguments, recipes and command-line overrides.

A run is described by three dataclasses of our own (`DataArguments`, `ModelArguments`,
`TrainingArguments`) plus the chosen method's ``arguments_class`` (a `MethodArguments` subclass).
Parsing happens in two passes: the first resolves ``method`` (from the command line, else the
recipe, else the default), the second parses every key against the union of the four dataclasses.

Sources, later wins: dataclass defaults < recipe YAML < ``--key value`` on the command line.
Unknown keys fail with the list of valid ones; values are converted and checked against the field
types (``int``, ``float``, ``bool``, ``str``, ``Optional[...]``, ``Literal[...]``, ``list[str]``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from data_utils.preparation import DEFAULT_SYNTHETIC_LABELED_FRACTION

from .recipe_reading import (
    ArgumentError,
    HelpRequested,
    convert_value,
    describe_fields,
    load_recipe,
    parse_cli_overrides,
    typed_fields,
    unknown_keys_message,
)

DEFAULT_METHOD = "supervised"
DEFAULT_MODEL = None  # the model follows the data and the method (model_setup.choose_model)
DEFAULT_SYNTHETIC_TASK = "multimodal"


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class DataArguments:
    dataset: str | None = _help(
        "stil dataset folder (save_to_disk layout) or Hub dataset id. None: build the embedded "
        "synthetic dataset (synthetic_task) into dataset_cache_dir and use it.",
        default=None,
    )
    synthetic_task: Literal["multimodal", "image", "landmarks"] = _help(
        "which embedded synthetic dataset to build when dataset is None", default=DEFAULT_SYNTHETIC_TASK
    )
    synthetic_num_samples: int = _help("rows of the synthetic dataset (all splits)", default=6000)
    synthetic_image_size: int = _help("image side of the synthetic dataset in pixels", default=32)
    dataset_cache_dir: str | None = _help(
        "where synthetic datasets are built (default: $STIL_CACHE or ~/.cache/stil)/datasets", default=None
    )
    labeled_fraction: float | None = _help(
        "the fraction of training rows that keep their label. With a dataset: re-draw its labelled subset with "
        "this fraction (stratified, seeded by `seed`; data_utils.labeled_split.LabelRedraw), None: use the "
        "dataset's labeled column. Without one: the fraction the synthetic dataset is built with "
        f"(data_utils.preparation.SyntheticBuild, None: {DEFAULT_SYNTHETIC_LABELED_FRACTION:g}; part of its cache folder's name)",
        default=None,
    )
    labeled_per_class: int | None = _help("re-draw the labelled subset with this many rows per class", default=None)
    view_preset: Literal["default", "dvm", "cardiac", "cifar", "aflw"] = _help(
        "augmentation strengths of data_utils.views (dvm/cardiac/cifar/aflw: the originals' settings)", default="default"
    )
    hflip: bool = _help(
        "image views flip horizontally (p 0.5) in every preset; false for data where a mirror image is another "
        "thing (digits, text, many medical images)", default=True
    )
    mu: int = _help("unlabelled batch size = mu * labelled batch size", default=7)
    dataloader_num_workers: int | Literal["auto"] = _help(
        "DataLoader worker processes of a training process's unlabelled stream (the labelled stream, "
        "1/(1+mu) of the rows, gets ceil(N/(1+mu)) more). auto: 0 when training on the CPU (the step "
        "needs the cores), else min(16, this process's share of the machine's cores - 1)", default="auto"
    )
    image_views_on_device: bool = _help(
        "make the training image views on the accelerator (data_utils.device_views): the loader ships resized "
        "uint8 images and per-row seeds, and crop/flip/colour jitter/grey/blur run batched on the device, for "
        "when CPU workers cannot feed the GPU. Views without a device version (RandAugment 'strong' for "
        "default/cifar, cardiac's contrastive view, translate) stay on the CPU; the run says which (docs/data.md)",
        default=False,
    )
    max_eval_samples: int | None = _help("evaluate on at most this many rows of validation/test", default=None)
    unlabeled_includes_labeled: bool | None = _help(
        "the unlabelled stream iterates over all train rows, labelled ones too (None: the method's default)", default=None
    )
    corruption_pool: Literal["split", "stream"] | None = _help(
        "tabular corruption draws replacement values from the whole train split or from the stream's own rows "
        "(None: the method's default)", default=None
    )
    augmentation_rate: float | None = _help(
        "probability that the joint ('hard') image+tabular augmentation is applied (None: the method's / view preset's)",
        default=None,
    )
    epoch_definition: Literal["unlabeled", "longest"] | None = _help(
        "one epoch = one pass over the unlabelled stream, or over the longer of the two streams (None: the method's)",
        default=None,
    )
    bad_images: Literal["error", "skip"] = _help(
        "every stored image is decoded once before training: 'error' refuses the run listing the unreadable rows "
        "(split, row, reason); 'skip' drops those rows with a warning that counts and lists them",
        default="error",
    )
    streaming: bool = _help(
        "read --dataset as streamed Parquet shards (a folder or fsspec URL written by scripts/prepare_dataset.py "
        "--streaming-shards N; data_utils.streaming): for data larger than a disk; needs --max_steps", default=False
    )
    standardize_targets: bool = _help(
        "regression/landmarks: train on targets standardised with the labelled rows' mean/std (stored in the "
        "model config; predictions come back in original units)", default=False
    )


@dataclass
class ModelArguments:
    model: str | None = _help(
        "preset name (modeling_stil.presets), local folder or Hub id. None: a preset that fits the data and the "
        "method (the method's preferred model, else image / tabular / image+tabular / landmarks by the data)",
        default=None,
    )
    model_overrides: dict | None = _help(
        "config overrides passed to create_model, e.g. --model_overrides '{hidden_size: 32}'", default=None
    )
    init_from: str | None = _help(
        "initialise matching encoders (and method state saved next to them) from a pretrained run or export: "
        "a tip_pretrain run folder, a converted original TIP/STiL checkpoint, or any stil export", default=None
    )


@dataclass
class TrainingArguments:
    method: str = _help("SSL method name (modeling_stil.methods registry)", default=DEFAULT_METHOD)
    output_dir: str = _help("run folder: checkpoints, logs, plots, export", default="runs/default")
    overwrite_output_dir: bool = _help(
        "start a fresh run in an output_dir that holds a run: only the paths the previous run listed in its "
        ".stil_manifest.json (checkpoints, logs, plots, run files, the export) are removed; other files make it "
        "refuse unless allow_foreign_files", default=False
    )
    allow_foreign_files: bool = _help(
        "with overwrite_output_dir: go ahead although output_dir holds files stil did not write (they are kept, "
        "never deleted or replaced)", default=False
    )
    per_device_train_batch_size: int = _help("labelled batch per process", default=32)
    per_device_eval_batch_size: int = _help("eval batch per process", default=128)
    max_steps: int = _help("optimisation steps; -1: use num_train_epochs", default=1000)
    num_train_epochs: float = _help("epochs (passes over the unlabelled data) when max_steps is -1", default=1.0)
    stop_after_steps: int | None = _help(
        "stop (with a checkpoint) after this many steps although the schedule runs to max_steps: "
        "for time-boxed jobs that are resumed later", default=None
    )
    learning_rate: float = _help("peak learning rate", default=1e-3)
    weight_decay: float = _help("weight decay (decoupled for adamw)", default=1e-4)
    weight_decay_scope: Literal["matrices", "all"] = _help(
        "which parameters weight_decay applies to: 'matrices' exempts biases and 1-d parameters (norms, tokens); "
        "'all' decays every parameter, as the STiL and TIP originals' Adam does", default="matrices"
    )
    optimizer: Literal["adamw", "adam", "sgd"] = _help("optimizer; adam and adamw use fused kernels on CUDA and CPU", default="adamw")
    momentum: float = _help("sgd momentum", default=0.9)
    nesterov: bool = _help("sgd nesterov", default=True)
    adam_beta1: float = _help("adam/adamw beta1", default=0.9)
    adam_beta2: float = _help("adam/adamw beta2", default=0.999)
    lr_scheduler: Literal["cosine", "linear", "constant", "fixmatch_cosine", "multistep"] = _help(
        "decay after warm-up: cosine to 0, linear to 0, constant, FixMatch's cos(7*pi*t/16), or multistep "
        "(times lr_gamma at each of lr_milestones)", default="cosine"
    )
    lr_milestones: list[float] = _help(
        "multistep: when to decay, as fractions of max_steps (< 1) or step numbers (>= 1)", default_factory=list
    )
    lr_gamma: float = _help("multistep: decay factor at each milestone", default=0.1)
    lr_scheduler_interval: Literal["step", "epoch"] = _help("update the learning rate every step or every epoch", default="step")
    warmup: float = _help("linear warm-up: a fraction of max_steps if < 1, else a number of steps", default=0.05)
    warmup_epochs: float | None = _help(
        "linear warm-up in epochs (overrides warmup; the originals' 'warmup_epochs: 10' with an epoch-wise schedule)",
        default=None,
    )
    warmup_from_zero: bool = _help(
        "the originals' warm-up shape (pl_bolts LinearWarmupCosineAnnealingLR): lr 0 in the first warm-up step "
        "(epoch with lr_scheduler_interval epoch), the peak in the last, k/(n-1); default: (step+1)/(warmup+1)",
        default=False,
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _help(
        "autocast precision; None: the accelerate config / launcher decides", default=None
    )
    gradient_accumulation_steps: int = _help("micro-batches per optimisation step", default=1)
    max_grad_norm: float | None = _help("clip gradients to this norm (None/0: no clipping)", default=1.0)
    seed: int = _help("seed for initialisation, augmentation and sampling", default=42)
    logging_steps: int = _help("reduce and log the accumulated training logs every N steps", default=10)
    eval_steps: int | None = _help("evaluate on validation every N steps (None: once per epoch)", default=100)
    save_steps: int | None = _help("checkpoint every N steps (None: at each evaluation)", default=None)
    save_total_limit: int | None = _help(
        "keep at most K checkpoints: the newest K, the best among them; when the best is older it is kept as well "
        "(K + 1 folders). None: keep all", default=2
    )
    resume_from_checkpoint: str | None = _help("checkpoint folder, or 'latest' in output_dir/checkpoints", default=None)
    metric_for_best_model: str | None = _help(
        "validation metric that selects the best model (None: accuracy for multiclass, auroc for binary, "
        "nme for landmarks, rmse for regression)", default=None
    )
    greater_is_better: bool | None = _help("direction of metric_for_best_model (None: inferred)", default=None)
    early_stopping_patience: int | None = _help(
        "stop after this many evaluations in a row in which metric_for_best_model did not beat its best by more "
        "than early_stopping_min_delta (Lightning's EarlyStopping, which the STiL originals use: 100, 1e-4). "
        "None: never stop early", default=None
    )
    early_stopping_min_delta: float = _help("smallest change of metric_for_best_model that counts as an improvement "
                                            "for early stopping", default=0.0)
    report_to: list[str] = _help(
        "trackers: tensorboard (default), wandb, comet_ml, mlflow, aim, ...; 'none' for JSONL only",
        default_factory=lambda: ["tensorboard"],
    )
    run_name: str | None = _help("tracker run name (default: output_dir's name)", default=None)
    push_to_hub: bool = _help("upload the exported folder to hub_model_id at the end", default=False)
    hub_model_id: str | None = _help("Hub repository for push_to_hub (user/name)", default=None)
    hub_private: bool = _help("create the Hub repository as private", default=False)
    hub_token: str | None = _help("Hub token (default: the logged-in token); never written to any file", default=None)
    torch_compile: bool = _help("torch.compile the model (GPU recommended)", default=False)
    channels_last: bool = _help("channels_last memory format (GPU convolution speed-up)", default=False)
    disable_tqdm: bool = _help("no progress bar", default=False)
    plots: bool = _help("write PNG plots into the run folder at every evaluation", default=True)
    export: bool = _help("export the selected model (save_pretrained + processor + card) and reload it", default=True)
    sync_batchnorm: bool = _help(
        "SyncBatchNorm across processes (CUDA only). Default: each process keeps its own BN statistics and they "
        "are averaged before every evaluation and checkpoint", default=False
    )
    find_unused_parameters: bool = _help(
        "DDP find_unused_parameters: true by default because presets carry heads some methods never use "
        "(projection heads); set false for speed when every parameter gets a gradient", default=True
    )


ARGUMENT_CLASSES = (DataArguments, ModelArguments, TrainingArguments)
# never written to a file, a tracker or a printed line
SECRET_SETTINGS = ("hub_token",)


@dataclass
class RunArguments:
    """The parsed run: one instance per argument group."""

    data: DataArguments
    model: ModelArguments
    training: TrainingArguments
    method: Any  # the method's MethodArguments subclass instance
    recipe: str | None = None
    # recipe keys that do not apply to this run (a recipe's labeled_fraction meeting --dataset on the command
    # line: the dataset keeps its own labels); cleared in the groups, so run_config.yaml records what ran
    unapplied: dict[str, Any] = field(default_factory=dict)

    def groups(self) -> dict[str, Any]:
        return {"data": self.data, "model": self.model, "training": self.training, "method": self.method}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(obj) for name, obj in self.groups().items()}

    def flat_dict(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for values in self.to_dict().values():
            flat.update(values)
        return flat

    def recorded_dict(self) -> dict[str, Any]:
        """`flat_dict` as any file, log line or tracker may record it: secrets (`SECRET_SETTINGS`) are None."""
        values = self.flat_dict()
        for key in SECRET_SETTINGS:
            if key in values:
                values[key] = None
        return values

    def save_yaml(self, path: str | os.PathLike) -> Path:
        """Write the resolved configuration as a recipe that reproduces the run (flat keys)."""
        path = Path(path)
        text = "# resolved configuration of this run; `train.py THIS_FILE` reproduces it\n"
        if any(self.flat_dict().get(key) for key in SECRET_SETTINGS):  # never in the run folder (push_to_hub uploads it)
            text += f"# {', '.join(SECRET_SETTINGS)}: given on the command line, not recorded\n"
        values = self.recorded_dict()
        text += yaml.safe_dump(values, sort_keys=False)
        path.write_text(text)
        return path


# ----------------------------------------------------------------------------------------- parsing
# A schedule's relative form (a fraction of max_steps) takes precedence over its absolute form. Each
# relative key and the absolute keys it replaces (the names differ between methods' papers).
RELATIVE_FORMS: dict[str, tuple[str, ...]] = {
    "start_fraction": ("start_epoch",),
    "instance_start_fraction": ("instance_start_epoch",),
    "smoothing_start_fraction": ("smoothing_start_epoch", "smoothing_start_step"),
    "ema_span_fraction": ("ema_momentum", "ema_decay"),
    "eval_ema_span_fraction": ("eval_ema_decay",),
    "lambda_c_rampup_fraction": ("lambda_c_ramp",),
}


def check_overridden_by_relative_form(values: dict[str, Any], overrides: dict[str, Any], method_fields: dict) -> None:
    """``--start_epoch 5`` on a recipe that sets ``start_fraction`` would be silently ignored (the relative
    form wins): refuse it, naming the key to clear."""
    for relative, absolutes in RELATIVE_FORMS.items():
        if relative not in method_fields or relative in overrides or values.get(relative) is None:
            continue
        for absolute in absolutes:
            if absolute in overrides and absolute in method_fields:
                raise ArgumentError(
                    f"--{absolute} {overrides[absolute]} would have no effect: the recipe sets {relative} "
                    f"{values[relative]}, its relative form, which takes precedence; add --{relative} null to use "
                    f"{absolute}, or set --{relative} instead")


def parse_run_arguments(argv: Sequence[str] | None = None, recipe_values: dict[str, Any] | None = None) -> RunArguments:
    """Parse ``[RECIPE.yaml] [--key value ...]`` into a `RunArguments` (two passes: method first)."""
    from ..methods.base import get_method_class

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        raise HelpRequested(format_help(_method_for_help(argv)))
    recipe, overrides = parse_cli_overrides(argv)
    values: dict[str, Any] = dict(recipe_values or {})
    if recipe is not None:
        values.update(load_recipe(recipe))
    values.update(overrides)

    # Pass 1: which method? (its dataclass decides which extra keys are valid)
    method_name = str(values.get("method", DEFAULT_METHOD))
    try:
        method_cls = get_method_class(method_name)
    except KeyError as error:
        raise ArgumentError(str(error.args[0])) from None
    classes = {"data": DataArguments, "model": ModelArguments, "training": TrainingArguments, "method": method_cls.arguments_class}
    owner: dict[str, str] = {}
    group_fields: dict[str, dict[str, dataclasses.Field]] = {}
    for group, cls in classes.items():
        group_fields[group] = typed_fields(cls)
        for name in group_fields[group]:
            if name in owner:
                raise ArgumentError(
                    f"method {method_name!r} argument {name!r} collides with a {owner[name]} argument; rename it"
                )
            owner[name] = group

    unknown = [k for k in values if k not in owner]
    if unknown:
        raise ArgumentError(unknown_keys_message(list(owner), unknown))

    # Pass 2: build every group with converted values
    built = {}
    for group, cls in classes.items():
        kwargs = {}
        for name, f in group_fields[group].items():
            if name in values:
                kwargs[name] = convert_value(values[name], f.type, name)
        try:
            built[group] = cls(**kwargs)
        except (TypeError, ValueError) as error:
            raise ArgumentError(f"invalid {group} arguments: {error}") from None
    check_overridden_by_relative_form(values, overrides, group_fields["method"])
    run = RunArguments(data=built["data"], model=built["model"], training=built["training"], method=built["method"], recipe=recipe)
    keep_own_labels(run, overrides)
    validate(run)
    return run


LABEL_REDRAW_KEYS = ("labeled_fraction", "labeled_per_class")


def keep_own_labels(run: RunArguments, command_line: dict[str, Any]) -> None:
    """A dataset's own labelled split is redrawn only on purpose: ``labeled_fraction`` /
    ``labeled_per_class`` on the command line, or in the recipe that names the dataset (a protocol such
    as supervised_aflw_10pct.yaml). A recipe's value meeting a ``--dataset`` from the command line is
    not applied (kept in ``run.unapplied`` for the run's "labelled rows" line)."""
    if run.data.dataset is None or "dataset" not in command_line:
        return
    for key in LABEL_REDRAW_KEYS:
        if key not in command_line and getattr(run.data, key) is not None:
            run.unapplied[key] = getattr(run.data, key)
            setattr(run.data, key, None)


def validate(run: RunArguments) -> None:
    t, d = run.training, run.data
    problems = []
    if t.max_steps == 0 or t.max_steps < -1:
        problems.append("max_steps must be > 0 (or -1 to use num_train_epochs)")
    if t.max_steps == -1 and t.num_train_epochs <= 0:
        problems.append("num_train_epochs must be > 0 when max_steps is -1")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(t, key) < 1:
            problems.append(f"{key} must be >= 1")
    for key in ("eval_steps", "save_steps", "save_total_limit", "stop_after_steps"):
        value = getattr(t, key)
        if value is not None and value < 1:
            problems.append(f"{key} must be >= 1 or None")
    if t.learning_rate <= 0:
        problems.append("learning_rate must be > 0")
    if t.warmup < 0:
        problems.append("warmup must be >= 0")
    if t.lr_scheduler == "multistep" and not t.lr_milestones:
        problems.append("lr_scheduler multistep needs lr_milestones (fractions of max_steps or step numbers)")
    if d.augmentation_rate is not None and not 0 <= d.augmentation_rate <= 1:
        problems.append("augmentation_rate must be in [0, 1]")
    if d.mu < 1:
        problems.append("mu must be >= 1")
    if d.labeled_fraction is not None and d.labeled_per_class is not None:
        problems.append("give labeled_fraction or labeled_per_class, not both")
    if d.labeled_fraction is not None and not 0 < d.labeled_fraction <= 1:
        problems.append("labeled_fraction must be in (0, 1]")
    if t.push_to_hub and not t.hub_model_id:
        problems.append("push_to_hub needs hub_model_id (user/name)")
    if t.push_to_hub and not t.export:
        problems.append("push_to_hub needs export: true")
    if problems:
        raise ArgumentError("invalid arguments:\n  " + "\n  ".join(problems))


def _method_for_help(argv: Sequence[str]) -> str | None:
    """The method named by ``--method X`` / ``--method=X`` or by the recipe, for ``--help``."""
    rest = [a for a in argv if a not in ("-h", "--help")]
    try:
        recipe, overrides = parse_cli_overrides(rest)
    except ArgumentError:
        return None
    if "method" in overrides and overrides["method"] is not True:
        return str(overrides["method"])
    if recipe is not None:
        try:
            return load_recipe(recipe).get("method")
        except (ArgumentError, OSError, yaml.YAMLError):
            return None
    return None


GROUP_TITLES = {DataArguments: "data", ModelArguments: "model", TrainingArguments: "training"}


def format_help(method: str | None = None) -> str:
    """Help text: usage, then each argument group with types, choices, defaults; with ``method``, that
    method's own arguments too (``train.py --method fixmatch --help``)."""
    from ..methods.base import get_method_class

    lines = [
        "usage: accelerate launch train.py [RECIPE.yaml] [--key value ...]",
        "       python train.py [--method NAME] --help   (NAME's own arguments are listed too)",
        "",
        "Values: recipe keys and --key value on the command line (later wins); booleans true/false; lists a,b,c.",
        "",
    ]
    for cls in ARGUMENT_CLASSES:
        lines.append(f"{GROUP_TITLES[cls]} arguments:")
        lines += describe_fields(cls)
        lines.append("")
    if method:
        try:
            method_cls = get_method_class(method)
        except KeyError as error:
            lines.append(f"method {method!r}: {error.args[0]}")
        else:
            described = describe_fields(method_cls.arguments_class)
            lines.append(f"method arguments ({method}):")
            lines += described or ["  (none)"]
            lines.append("")
    else:
        from ..methods import _import_all  # noqa: F401  (registers the built-in methods)
        from ..methods.base import METHODS

        names = ", ".join(sorted(METHODS))
        lines.append("method arguments: name a method to list them, e.g. `train.py --method fixmatch --help`"
                     + (f" (methods: {names})" if names else ""))
    return "\n".join(lines)
