"""The one configuration schema: params.yaml, Prefect flow parameters and command lines all
validate through `PipelineConfig`, so a typo or an impossible value fails before any work."""
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from convheads import ConvHeadsError
from convheads.data import AUGMENTATIONS
from convheads.layers import CONV_VARIANTS
from convheads.precision import DEVICES, PRECISIONS
from convheads.selection import GRANULARITIES, METHODS
from convheads.surgery import INITS, VARIANTS
from convheads.training import TRAINABLE

RUNTIMES = ("onnxruntime", "eager", "compile")  # benchmark.runtimes


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(Section):
    data: str = "data/dataset"   # the materialised dataset (tracked by DVC)
    outputs: str = "outputs"     # one folder per stage


class DataConfig(Section):
    """Where the images come from. A folder or CSV is read in place (never copied): the data stage
    writes a manifest (path, label, split, size, content hash) whose hash is the data version."""
    source: Literal["digits", "folder", "csv", "torchvision"] = "digits"
    # folder: <path>/<class>/<image>, or <path>/{train,val,test}/<class>/<image> (ImageNet: train/ and val/);
    # csv: a CSV file with columns path, label[, split] (paths relative to the CSV's folder)
    path: Optional[str] = None
    classes: Optional[List[str]] = None     # the class list, in label order; None: sorted folder names / labels
    torchvision_name: Optional[str] = None  # source=torchvision: a torchvision.datasets class, e.g. "CIFAR10"
    download_dir: str = "data/downloads"    # where torchvision datasets are downloaded to
    image_size: PositiveInt = 32            # digits: the size the 8 x 8 digits are rendered at
    val_fraction: float = Field(0.15, gt=0, lt=1)   # splits a source does not have are carved out
    test_fraction: float = Field(0.15, gt=0, lt=1)  # of the training images, by a seeded hash of each path
    seed: int = 0

    @model_validator(mode="after")
    def _source_needs(self):
        if self.source in ("folder", "csv") and not self.path:
            raise ValueError(f"data.source={self.source} needs data.path (" + (
                "a class-per-subfolder image folder)" if self.source == "folder" else "a CSV file: path,label[,split])"))
        if self.source == "torchvision" and not self.torchvision_name:
            raise ValueError("data.source=torchvision needs data.torchvision_name (e.g. CIFAR10)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must be below 1")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("data.classes lists a class twice")
        return self


# Fine-tuning settings left None, per task: the default segmentation run has 4x the tokens of the
# digits (256) and fewer images, so fewer epochs (it must stay within minutes) of smaller batches
# (more steps).
TASK_DEFAULTS = {"baseline": {"classification": {"epochs": 40, "batch_size": 32},
                              "segmentation": {"epochs": 10, "batch_size": 8}},
                 "recover": {"classification": {"epochs": 20, "batch_size": 32, "lr": 1e-3},
                             "segmentation": {"epochs": 3, "batch_size": 8, "lr": 5e-4}}}

# The default model: a small ViT for the 32 x 32 digits (an 8 x 8 patch grid, 6 blocks of 8 heads).
DIGITS_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 8}
# For the digits scenes (task=segmentation): 4x the tokens (16 x 16 at 64 x 64), so half the width
# to train in minutes; 6 blocks of 4 heads of width 16.
SCENES_VIT = {"patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4}


class ModelConfig(Section):
    name: str = "vit_tiny_patch16_224"  # timm name, name.tag (which weights) or hf-hub:<org>/<repo>
    pretrained: bool = False            # timm's pretrained weights (needs network access, or the HF cache)
    checkpoint: Optional[str] = None    # or a local state-dict file (timm, original DINOv2, or a model.pt of ours)
    # timm.create_model arguments; num_classes is set from the dataset. None: DIGITS_VIT when the
    # model trains from scratch (neither pretrained nor checkpoint), else the model's own ({}).
    kwargs: Optional[Dict[str, Any]] = None
    mean: Optional[Tuple[float, float, float]] = None  # input normalisation; None: the model's default
    std: Optional[Tuple[float, float, float]] = None
    crop_pct: Optional[float] = Field(None, gt=0, le=1)  # eval centre crop; None: the model's (1.0 for digits)

    @property
    def build_kwargs(self) -> Dict[str, Any]:
        """The timm.create_model arguments this configuration means (see `kwargs`)."""
        if self.kwargs is not None:
            return dict(self.kwargs)
        return {} if self.pretrained or self.checkpoint else dict(DIGITS_VIT)


class SceneCounts(Section):
    """How many digits scenes each split of the embedded segmentation data has."""
    train: PositiveInt = 300
    val: PositiveInt = 60
    test: PositiveInt = 200


class SegmentationConfig(Section):
    """task: segmentation. Data: data.source=digits (scenes of the bundled digits, generated) or
    folder (ADE20K's layout: images/{training,validation}/, annotations/{training,validation}/,
    single-channel PNG labels, 255 = not labelled)."""
    image_size: PositiveInt = 64                     # images (and masks) are resized to this; the model is built for it
    feature_blocks: Optional[List[int]] = None       # blocks whose patch tokens feed the linear head; None: the last
    num_classes: Optional[PositiveInt] = None        # None: the dataset's (classes.txt, else the largest label + 1)
    reduce_zero_label: bool = False                 # ADE20K: label 0 is "other" -> ignored, the rest move down by 1
    scenes: SceneCounts = SceneCounts()              # data.source=digits: scenes per split (64 x 64 at image_size 64)


class TrainConfig(Section):
    epochs: Optional[int] = Field(None, ge=0)       # None: the task's default (TASK_DEFAULTS)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: Optional[PositiveInt] = None        # None: the task's default (TASK_DEFAULTS)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # auto: light for the digits, timm otherwise; timm: timm's train transform (random resized crop,
    # flip, colour jitter); light: small shifts and rotations, no flips or crops; none: eval transform
    augment: Literal[AUGMENTATIONS] = "auto"

    # One update sees batch_size images, whatever the number of processes: each of P processes takes
    # batch_size / (P x accumulation) per step, and the gradients of `accumulation` steps add up.
    accumulation: PositiveInt = 1
    clip_grad: Optional[float] = Field(None, gt=0)        # clip the gradients' global norm to this
    grad_checkpointing: bool = False                      # recompute activations in the backward pass: less memory
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)  # keep an EMA of the weights (e.g. 0.999); saved instead
    layer_decay: Optional[float] = Field(None, gt=0, le=1)  # layer-wise lr decay (timm), e.g. 0.75

    @field_validator("augment", mode="before")
    @classmethod
    def _bool_augment(cls, v):  # params files from before the presets: true / false
        return {True: "auto", False: "none"}.get(v, v) if isinstance(v, bool) else v


class RecoverConfig(TrainConfig):
    # None: the task's (TASK_DEFAULTS). Classification: 20 epochs at the baseline's lr: on the digits
    # default 10 epochs (at 5e-4 or 1e-3) left the replaced model 2-2.6 pts short on some seeds; 20 at
    # 1e-3 recovers to within a test image or two
    lr: Optional[float] = Field(None, gt=0)
    trainable: Literal[TRAINABLE] = "all"   # "new": only kernels and prefix scalars train


class LoaderConfig(Section):
    """DataLoader settings: images are decoded and transformed in worker processes. In no stage's
    fingerprint: every sample's augmentation is seeded on its own, so they change speed, not results."""
    # None: one per CPU core but one, at most 8. The data stage hashes with this many processes
    # (None: one per core, at most 8).
    num_workers: Optional[int] = Field(None, ge=0)
    pin_memory: Optional[bool] = None               # None: on when device is cuda
    persistent_workers: bool = True                 # keep workers between epochs


class ScoreConfig(Section):
    max_images: int = Field(1000, ge=2)   # training images used for Sigma_h
    batch_size: PositiveInt = 8


DSP = "dsp"  # select.method: learned during recovery (convheads.dsp)


class DSPConfig(Section):
    """select.method=dsp: gates learn the choice during recovery (convheads/dsp.py)."""
    temperature_start: float = Field(1.0, gt=0)
    temperature_end: float = Field(1e-3, gt=0)
    anneal_epochs: Optional[PositiveInt] = None   # None: all of recover.epochs; then the end temperature
    gate_lr: float = Field(0.01, gt=0)           # the gates' own lr (no weight decay)

    @model_validator(mode="after")
    def _falls(self):
        if self.temperature_end > self.temperature_start:
            raise ValueError(f"the temperature must fall: temperature_end {self.temperature_end} > temperature_start "
                             f"{self.temperature_start} (e.g. 1.0 -> 0.001)")
        return self


class SelectConfig(Section):
    """What to replace; the first rule that is set wins: blocks, then count, then fraction. `method`
    ranks the heads for count / fraction (convheads.selection.METHODS): sigma (lowest Sigma first),
    fit (best fit of a replace.kernel_size band + uniform level first), sigma_fit (rank sum),
    random (seeded by `seed`: a control) or dsp (learned by gates during recovery: see DSPConfig)."""
    method: Literal[METHODS + (DSP,)] = "sigma"
    dsp: DSPConfig = DSPConfig()
    max_drop: Optional[float] = Field(None, gt=0, le=1)  # flows.sweep: register the largest budget within this drop
    granularity: Literal[GRANULARITIES] = "block"
    blocks: Optional[List[int]] = None      # exactly these whole blocks (e.g. a published list)
    count: Optional[PositiveInt] = None     # this many heads (or blocks, by granularity)
    fraction: Optional[float] = Field(0.5, gt=0, le=1)  # this fraction of all heads (or blocks)

    @model_validator(mode="after")
    def _some_rule(self):
        if self.blocks is None and self.count is None and self.fraction is None:
            raise ValueError("set one of select.blocks, select.count, select.fraction")
        return self


class ReplaceConfig(Section):
    kernel_size: PositiveInt = 3
    init: Literal[INITS] = "attention"
    variant: Literal[VARIANTS] = "depthwise"


class EvaluateConfig(Section):
    batch_size: PositiveInt = 256


class BenchmarkConfig(Section):
    batch_sizes: List[PositiveInt] = [1, 64]
    # Where the models are timed; the first gives the headline speedup (summary, registry gate).
    # onnxruntime: the ONNX export, as deployed (CPU); eager / compile: PyTorch (torch.compile).
    runtimes: List[Literal[RUNTIMES]] = Field(["onnxruntime", "eager"], min_length=1)
    repeats: PositiveInt = 20
    warmup: int = Field(3, ge=0)
    threads: Optional[PositiveInt] = None   # None: torch's default for this machine

    @model_validator(mode="after")
    def _distinct(self):
        if len(set(self.runtimes)) != len(self.runtimes):
            raise ValueError(f"benchmark.runtimes lists a runtime twice: {self.runtimes}")
        return self


class DistributedConfig(Section):
    """The training stages (baseline, recover) over several processes: torchrun starts
    nproc_per_node on each of nnodes machines; not in any fingerprint (the same global batch gives
    the same model, to float rounding, on any number of processes)."""
    nproc_per_node: PositiveInt = 1       # processes on this machine: one per GPU (or a share of the CPU cores)
    nnodes: PositiveInt = 1               # machines
    node_rank: int = Field(0, ge=0)       # this machine's rank: 0 hosts the rendezvous and writes the outputs
    rdzv_endpoint: Optional[str] = None   # several machines: node 0's host:port, e.g. 10.0.0.1:29500
    rdzv_timeout: PositiveInt = 300       # seconds a machine waits for the others to join

    @model_validator(mode="after")
    def _machines(self):
        if self.node_rank >= self.nnodes:
            raise ValueError(f"distributed.node_rank must be below distributed.nnodes={self.nnodes}")
        if self.nnodes > 1:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("several machines (distributed.nnodes > 1) need distributed.rdzv_endpoint: node 0's "
                                 "host:port, e.g. 10.0.0.1:29500")
        return self


SWEEP_METHODS = ("sigma_h", "sigma_b", DSP, "random", "drop")
TASK_RUNNERS = ("local", "dask")


class SweepConfig(Section):
    """python -m flows.sweep: replace + recover + evaluate for every (method, budget, seed) on one
    shared baseline and score file, then every model benchmarked together. Methods: sigma_h (heads
    by Sigma_h), sigma_b (whole blocks by Sigma_b), dsp (learned; select.granularity), random
    (seeded; select.granularity), drop (Sigma's choice at select.granularity, heads removed)."""
    budgets: List[float] = Field([0.1667, 0.3333, 0.5], min_length=1)  # fractions of the heads (blocks)
    methods: List[Literal[SWEEP_METHODS]] = Field(["sigma_b", "dsp", "random"], min_length=1)
    seeds: List[int] = Field([0], min_length=1)
    recover_epochs: Optional[int] = Field(3, ge=0)   # None: recover.epochs
    task_runner: Literal[TASK_RUNNERS] = "local"     # local: one point after another; dask: on a cluster
    address: Optional[str] = None                    # dask: the scheduler, e.g. tcp://10.0.0.1:8786

    @field_validator("budgets")
    @classmethod
    def _fractions(cls, v):
        if any(not 0 < b <= 1 for b in v):
            raise ValueError(f"budgets are fractions of the heads (or blocks), in (0, 1]; got {v}")
        return v

    @model_validator(mode="after")
    def _runner(self):
        if self.task_runner == "dask" and not self.address:
            raise ValueError("sweep.task_runner=dask needs sweep.address: the Dask scheduler, e.g. tcp://10.0.0.1:8786")
        for name in ("budgets", "methods", "seeds"):
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ValueError(f"sweep.{name} lists a value twice: {getattr(self, name)}")
        return self


class TrackingConfig(Section):
    tracking_uri: Optional[str] = None      # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "convheads"


class RegistryConfig(Section):
    """Every run registers its compressed model; the gate decides whether it becomes champion."""
    enabled: bool = True
    model_name: Optional[str] = None          # None: convheads-<model.name>[-segmentation]
    # The gate's headline metric is the task's: test top-1 (classification) or mIoU (segmentation).
    max_top1_drop: float = Field(0.02, ge=0, le=1)   # classification: vs the run's baseline, as a fraction (0.02 = 2 points)
    max_miou_drop: float = Field(0.02, ge=0, le=1)   # segmentation: the same for mIoU
    min_speedup: float = Field(1.0, gt=0)     # compressed vs baseline latency ...
    speedup_batch_size: Optional[PositiveInt] = None  # ... at this benchmark batch size (None: the largest)
    must_beat_champion: bool = True           # higher test top-1 (mIoU) than the champion, on this run's test data ...
    min_improvement: float = Field(0.0, ge=0, le=1)  # ... by at least this much (0.005 = half a point)


class ScheduleConfig(Section):
    """`python -m flows.serve`: the compression flow as a Prefect deployment on a cron schedule."""
    deployment: str = "scheduled"
    cron: str = "0 3 * * *"                   # every day at 03:00
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _valid_schedule(self):
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except ValueError:
            raise ValueError(f"schedule.cron {self.cron!r} with timezone {self.timezone!r} is not a valid "
                             f"cron schedule (e.g. '0 3 * * *')") from None
        return self


class PipelineConfig(Section):
    task: Literal["classification", "segmentation"] = "classification"
    seed: int = 0
    device: str = "auto"                      # auto (cuda when there is a GPU) | cpu | cuda | cuda:N
    precision: Literal[PRECISIONS] = "fp32"   # fp32 | bf16 | fp16 (autocast; fp16 needs a GPU)
    distributed: DistributedConfig = DistributedConfig()
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    baseline: TrainConfig = TrainConfig()
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig = SelectConfig()
    replace: ReplaceConfig = ReplaceConfig()
    recover: RecoverConfig = RecoverConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    loader: LoaderConfig = LoaderConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    sweep: SweepConfig = SweepConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if v not in DEVICES and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N)")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.replace.kernel_size % 2 == 0:
            raise ValueError("replace.kernel_size must be odd ('same' padding)")
        if self.replace.variant == "ensemble" and self.select.blocks is None and self.select.granularity != "block":
            raise ValueError("replace.variant=ensemble merges whole blocks; set select.granularity=block "
                             "(or select.blocks)")
        if self.select.method == DSP and self.replace.variant not in CONV_VARIANTS:
            raise ValueError(f"select.method=dsp gates a convolution branch: replace.variant must be one of "
                             f"{CONV_VARIANTS}")
        if self.task == "segmentation" and self.data.source not in ("digits", "folder"):
            raise ValueError("task=segmentation reads data.source=digits (generated scenes) or folder (ADE20K's "
                             f"layout), not {self.data.source}")
        if self.registry.speedup_batch_size not in (None, *self.benchmark.batch_sizes):
            raise ValueError(f"registry.speedup_batch_size must be one of benchmark.batch_sizes "
                             f"{self.benchmark.batch_sizes}")
        return self

    @property
    def registered_model_name(self) -> str:
        """registry.model_name, else convheads-<model.name> (-segmentation for that task)."""
        suffix = "-segmentation" if self.task == "segmentation" else ""
        return self.registry.model_name or f"convheads-{self.model.name}{suffix}"

    @property
    def model_kwargs(self) -> Dict[str, Any]:
        """The timm.create_model arguments this configuration means: model.kwargs, or its default
        (ModelConfig.build_kwargs); for segmentation, SCENES_VIT instead of DIGITS_VIT, built for
        segmentation.image_size unless model.kwargs sets img_size."""
        kwargs = self.model.build_kwargs
        if self.task == "segmentation":
            if kwargs == DIGITS_VIT:
                kwargs = dict(SCENES_VIT)
            if "img_size" not in (self.model.kwargs or {}):
                kwargs["img_size"] = self.segmentation.image_size
        return kwargs

    def training(self, stage: str) -> TrainConfig:
        """The fine-tuning settings of `stage` (baseline or recover), with the task's defaults for
        those left None."""
        settings = getattr(self, stage)
        return settings.model_copy(update={k: v for k, v in TASK_DEFAULTS[stage][self.task].items()
                                           if getattr(settings, k) is None})

    @property
    def gate_batch_size(self) -> int:
        return self.registry.speedup_batch_size or max(self.benchmark.batch_sizes)

    def resolved(self) -> dict:
        """The whole configuration as plain data with the training stages' task defaults filled in:
        what a run records (MLflow params, its params.yaml), so that null never stands for a value."""
        return {**self.model_dump(mode="json"), **{n: self.training(n).model_dump(mode="json") for n in TASK_DEFAULTS}}

    def section(self, *names: str) -> dict:
        """The named sections as plain data (what a stage's fingerprint depends on, what MLflow
        records), the training stages' with the task's defaults filled in; the segmentation
        section is None unless task is segmentation (it changes nothing else)."""
        return {n: None if n == "segmentation" and self.task != "segmentation" else
                self.training(n).model_dump(mode="json") if n in TASK_DEFAULTS else
                getattr(self, n).model_dump(mode="json") if isinstance(getattr(self, n), BaseModel)
                else getattr(self, n) for n in names}


def _explain(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {key}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden"
                                         and not isinstance(err["input"], dict) else ""))
    return "invalid configuration:\n" + "\n".join(lines)


def validate(data: dict) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data or {})
    except ValidationError as e:
        raise ConvHeadsError(_explain(e)) from None


class Whole(dict):
    """A mapping given whole (`model.kwargs={}`): it replaces the value it overrides, not merges into it."""


def parse_overrides(items: List[str]) -> Dict[str, Any]:
    """["recover.epochs=3", "select.blocks=[1, 2]"] -> nested dict (values parsed as YAML).

    `model.kwargs.img_size=64` sets one key inside model.kwargs; `model.kwargs={img_size: 64}`
    replaces model.kwargs whole (and `model.kwargs={}` empties it)."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConvHeadsError(f"override {item!r} is not key=value (e.g. recover.epochs=3)")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        value = yaml.safe_load(raw) if raw.strip() else None
        node[leaf] = Whole(value) if isinstance(value, dict) else value
    return out


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and not isinstance(v, Whole) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = dict(v) if isinstance(v, Whole) else v
    return out


def load_config(params_file: Optional[str] = "params.yaml", overrides: Optional[List[str]] = None) -> PipelineConfig:
    """params.yaml (if it exists; missing keys take their defaults), then key=value overrides
    applied on top of the result, validated."""
    data: dict = {}
    if params_file and Path(params_file).exists():
        try:
            data = yaml.safe_load(Path(params_file).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConvHeadsError(f"{params_file} is not valid YAML: {e}") from None
    base = validate(data).model_dump(mode="json")
    return validate(merge(base, parse_overrides(overrides or [])))
