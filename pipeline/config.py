"""The one configuration schema: params.yaml, Prefect flow parameters and command lines all
validate through `PipelineConfig`, so a typo or an impossible value fails before any work.

Every default is written once, here: a field's default, or (where it depends on the task) in
TASK_DEFAULTS. A field's docstring is its documentation: params.yaml and the configuration
reference are generated from this file (`python -m pipeline params`). Sections that configure
the library extend its own settings (convheads' TrainSettings, ReplaceSettings, DSPSettings), so
the library's checks are the configuration's.
"""
import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator
from pydantic.dataclasses import dataclass as settings_section

from convheads import ConvHeadsError
from convheads.data.images import AUGMENTATIONS
from convheads.data.photos import PhotoSettings
from convheads.dsp import DSPSettings
from convheads.engine.timing import INT8_RUNTIME, ONNX_RUNTIMES, RUNTIMES
from convheads.engine.training import TrainSettings
from convheads.fitting import FITTED
from convheads.layers import CONV_VARIANTS
from convheads.mim import PretrainSettings
from convheads.precision import DEVICES, PRECISIONS, resolve_device
from convheads.scoring import SIGMA_TOKENS
from convheads.selection import GRANULARITIES, METHODS
from convheads.surgery import BLOCK_VARIANTS, ReplaceSettings

TASKS = ("classification", "segmentation")
EMBEDDED = ("digits", "photos")   # data sources generated from what the installed packages ship, at data.image_size

# The training settings that depend on the task, filled in where a configuration leaves them out
# (or null). The default segmentation run has 4x the tokens of the digits (256) and fewer images,
# so fewer epochs (it must stay within minutes) of smaller batches (more steps). Classification
# recovers for 20 epochs: on the digits default 10 epochs left the replaced model 2-2.6 points
# short on some seeds; 20 recover to within a test image or two.
TASK_DEFAULTS = {
    "classification": {"baseline": {"epochs": 40, "batch_size": 32},
                       "recover": {"epochs": 20, "batch_size": 32, "lr": 1e-3}},
    "segmentation": {"baseline": {"epochs": 10, "batch_size": 8},
                     "recover": {"epochs": 3, "batch_size": 8, "lr": 5e-4}},
}

# The default model: a small ViT for the 32 x 32 digits (an 8 x 8 patch grid, 6 blocks of 8 heads).
DIGITS_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 8}
# For the digits scenes (task=segmentation): 4x the tokens (16 x 16 at 64 x 64), so half the width
# to train in minutes; 6 blocks of 4 heads of width 16.
SCENES_VIT = {"patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4}

# The embedded default's backbone: pretrained by `python -m flows.pretrain --ship` (pipeline/stages/pretrain.py).
PHOTOS_CHECKPOINT = "data/pretrained/photos_vit.pt"

SECTION = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class PathsConfig(Section):
    data: str = "data/dataset"
    """The data stage's output: the manifest and meta (and generated images); tracked by DVC."""
    outputs: str = "outputs"
    """One folder per stage."""


class PhotosConfig(Section):
    """data.source=photos: crops of the photographs bundled with scikit-image and scikit-learn, labelled by the
    photograph they come from. Each photograph is cut into tiles and every tile belongs to one split, so test
    crops share no pixel with training crops (convheads/data/photos.py)."""
    tile: PositiveInt = 64
    """Side of the tiles, in the photographs' pixels; data.val_fraction and data.test_fraction of them are held out."""
    crop: PositiveInt = 48
    """Side of a crop, in the photographs' pixels (at most tile); resized to data.image_size."""
    train: PositiveInt = 300
    """Crops per photograph (class) in each split."""
    val: PositiveInt = 60
    test: PositiveInt = 280
    """18 photographs x 280 = 5,040 test crops: a 1-point difference between two models is resolved."""

    @model_validator(mode="after")
    def _fits(self):
        if self.crop > self.tile:
            raise ValueError(f"data.photos.crop ({self.crop} px) must fit inside a tile (data.photos.tile = "
                             f"{self.tile} px): lower crop or raise tile")
        return self


class DataConfig(Section):
    """Where the images come from. A folder or CSV is read in place (never copied): the data stage
    writes a manifest (path, label, split, size, content hash) whose hash is the data version."""
    source: Literal["digits", "photos", "folder", "csv", "torchvision"] = "digits"
    """digits (bundled with scikit-learn) | photos (crops of the photographs bundled with scikit-image and
    scikit-learn) | folder | csv | torchvision."""
    path: Optional[str] = None
    """folder: <path>/<class>/<image>, or <path>/{train,val,test}/<class>/<image> (ImageNet's train/ and val/:
    val is the test split); csv: a CSV file with columns path,label[,split], paths relative to its folder."""
    classes: Optional[List[str]] = None
    """The class list in label order; null: sorted folder names / labels."""
    torchvision_name: Optional[str] = None
    """source=torchvision: a torchvision.datasets class, e.g. CIFAR10 (downloads when online)."""
    download_dir: str = "data/downloads"
    """Where torchvision datasets are downloaded to."""
    image_size: PositiveInt = 32
    """digits, photos: the size the images are rendered at."""
    photos: PhotosConfig = PhotosConfig()
    val_fraction: float = Field(0.15, gt=0, lt=1)
    """Splits a source does not have are carved out of its training images, by a seeded hash of each path."""
    test_fraction: float = Field(0.15, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _source_needs(self):
        if self.source in ("folder", "csv") and not self.path:
            what = "a class-per-subfolder image folder" if self.source == "folder" else "a CSV file: path,label[,split]"
            raise ValueError(f"data.source={self.source} needs data.path ({what})")
        if self.source == "torchvision" and not self.torchvision_name:
            raise ValueError("data.source=torchvision needs data.torchvision_name (e.g. CIFAR10)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must be below 1")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("data.classes lists a class twice")
        return self


class ModelConfig(Section):
    name: str = "vit_tiny_patch16_224"
    """Any timm ViT: a name, name.tag (which weights, e.g. vit_large_patch14_dinov2.lvd142m) or hf-hub:org/repo."""
    pretrained: bool = False
    """timm's pretrained weights (network access, or the Hugging Face cache)."""
    checkpoint: Optional[str] = None
    """Or a local state-dict file (timm, original DINOv2, or a model.pt of ours)."""
    kwargs: Optional[Dict[str, Any]] = None
    """timm.create_model arguments (num_classes comes from the data); null: the digits ViT (img_size 32, patch_size
    4, embed_dim 128, depth 6, num_heads 8) when training from scratch (segmentation: embed_dim 64, num_heads 4 at
    segmentation.image_size), the model's own with pretrained or checkpoint."""
    mean: Optional[Tuple[float, float, float]] = None
    """Input normalisation; null: the model's default."""
    std: Optional[Tuple[float, float, float]] = None
    crop_pct: Optional[float] = Field(None, gt=0, le=1)
    """Eval centre crop (timm); null: the model's (1.0 for the digits)."""

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
    """task=segmentation: a linear head (BatchNorm + 1x1 conv) on the ViT's patch tokens. Data:
    data.source=digits (scenes of the bundled digits, generated) or folder (ADE20K's layout:
    images/{training,validation}/, annotations/{training,validation}/, single-channel PNG labels,
    255 = not labelled)."""
    image_size: PositiveInt = 64
    """Images and masks are resized to this; the model is built for it (patch 4: 16 x 16 tokens)."""
    feature_blocks: Optional[List[int]] = None
    """Blocks whose patch tokens feed the head, e.g. [4, 11, 17, 23] (DINOv2-L); null: the last."""
    num_classes: Optional[PositiveInt] = None
    """null: the dataset's (classes.txt, else the largest label + 1); 255 = not labelled."""
    reduce_zero_label: bool = False
    """ADE20K: label 0 ("other") is ignored and the others move down by one."""
    scenes: SceneCounts = SceneCounts()
    """data.source=digits: scenes of 2-4 digits per split, label = digit + 1."""


@settings_section(frozen=True, kw_only=True, config=SECTION)
class TrainConfig(TrainSettings):
    """A fine-tuning stage: convheads' TrainSettings, and the batches it is fed."""
    batch_size: PositiveInt
    """The global batch of one update, whatever the number of processes: each of P processes takes
    batch_size / (P x accumulation) per step."""
    augment: Literal[AUGMENTATIONS] = "auto"
    """auto: light for the digits, timm otherwise | timm (random resized crop, flip, colour jitter) | light
    (small shifts and rotations, no flips or crops) | none (the eval transform)."""


class LoaderConfig(Section):
    """DataLoader settings: images are decoded and transformed in worker processes. In no stage's
    fingerprint: every sample's augmentation is seeded on its own, so they change speed, not results."""
    num_workers: Optional[int] = Field(None, ge=0)
    """null: one per CPU core but one, at most 8 (the data stage hashes with one per core, at most 8)."""
    pin_memory: Optional[bool] = None
    """null: on for cuda."""
    persistent_workers: bool = True
    """Keep the workers between epochs."""


PRETRAIN_SOURCES = ("photos", "folder")


@settings_section(frozen=True, kw_only=True, config=SECTION)
class PretrainConfig(PretrainSettings):
    """Stage pretrain (python -m flows.pretrain): masked image modelling (SimMIM, convheads/mim.py) of a ViT
    on random crops of the training tiles, the way foundation models learn convolution-like heads. Its
    backbone.pt is what model.checkpoint takes; the embedded default ships one (data/pretrained/)."""
    source: Literal[PRETRAIN_SOURCES] = "photos"
    """photos (the bundled photographs' training tiles, data.photos) | folder (every image under pretrain.path,
    tiled the same way)."""
    path: Optional[str] = None
    """source=folder: a folder of images (any layout; labels are not used)."""
    kwargs: Dict[str, Any] = Field(default_factory=lambda: dict(DIGITS_VIT))
    """timm.create_model arguments of the ViT (model.name's family) to pretrain."""
    scale: Tuple[float, float] = (0.5, 1.25)
    """Crop sides, relative to data.photos.crop, are drawn from this range (at most tile / crop)."""

    @model_validator(mode="after")
    def _source_needs(self):
        if self.source == "folder" and not self.path:
            raise ValueError("pretrain.source=folder needs pretrain.path: a folder of images")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"pretrain.scale must be (low, high) with 0 < low <= high; got {self.scale}")
        return self


class ScoreConfig(Section):
    max_images: int = Field(1000, ge=2)
    """Training images Sigma_h is measured on."""
    batch_size: PositiveInt = 8
    sigma_tokens: Literal[SIGMA_TOKENS] = "patches"
    """patches: Sigma_h sums the std of the patch-to-patch weights, what the convolution replaces (the
    reference's, without CLS; prefix tokens have their own scalars) | all: over every (query, key) pair."""


DSP = "dsp"  # select.method: learned during recovery (convheads.dsp)


@settings_section(frozen=True, kw_only=True, config=SECTION)
class DSPConfig(DSPSettings):
    """select.method=dsp: gates learn the choice during recovery (convheads/dsp.py)."""
    anneal_epochs: Optional[PositiveInt] = None
    """The temperature falls over this many recovery epochs (null: all the gated epochs)."""
    hard_epochs: int = Field(1, ge=0)
    """The last recovery epochs train the finalised model (the hard top-k, no gates, no noise); the gates train
    in the epochs before them (at least one: with recover.epochs <= hard_epochs, all but one are hard)."""


class SelectConfig(Section):
    """What to replace; the first rule that is set wins: blocks, then count, then fraction."""
    method: Literal[METHODS + (DSP,)] = "sigma"
    """How count / fraction rank the heads: sigma (lowest Sigma_h / Sigma_b) | fit (best band + uniform fit of
    E[A], replace.kernel_size) | sigma_fit (rank sum of both) | random (seeded by seed: a control) | dsp (learned
    by gates during recovery)."""
    dsp: DSPConfig = DSPConfig()
    max_drop: Optional[float] = Field(None, gt=0, le=1)
    """python -m flows.sweep: register the largest budget whose mean drop of the headline metric is within this
    (0.02 = 2 points); null: register nothing."""
    granularity: Literal[GRANULARITIES] = "block"
    """block (whole blocks, the paper's main setting) | head (scattered)."""
    blocks: Optional[List[int]] = None
    """Exactly these whole blocks, e.g. [8, 6, 4, 9] (a published list)."""
    count: Optional[PositiveInt] = None
    """This many heads (or blocks, by granularity)."""
    fraction: Optional[float] = Field(0.5, gt=0, le=1)
    """This fraction of all heads (or blocks)."""

    @model_validator(mode="after")
    def _some_rule(self):
        if self.blocks is None and self.count is None and self.fraction is None:
            raise ValueError("set one of select.blocks, select.count, select.fraction")
        return self


@settings_section(frozen=True, kw_only=True, config=SECTION)
class ReplaceConfig(ReplaceSettings):
    init: str = "attention"
    """attention (fitted to each head's mean attention in the scores) | gaussian (the reference's)."""


class EvaluateConfig(Section):
    batch_size: PositiveInt = 256


class BenchmarkConfig(Section):
    batch_sizes: List[PositiveInt] = [1, 64]
    runtimes: List[Literal[RUNTIMES]] = Field(["onnxruntime", "eager"], min_length=1)
    """Where the models are timed; the first gives the headline speedup (summary, registry gate): onnxruntime
    (the ONNX export, as deployed; CPU only, left out on a GPU) | onnxruntime-int8 (the same, quantized to INT8
    and calibrated on training images; the evaluate stage then also measures the INT8 model's accuracy, which
    the registry gates on when this runtime is first) | eager | compile (PyTorch)."""
    repeats: PositiveInt = 20
    warmup: int = Field(3, ge=0)
    threads: Optional[PositiveInt] = None
    """null: torch's default for this machine."""

    @model_validator(mode="after")
    def _distinct(self):
        if len(set(self.runtimes)) != len(self.runtimes):
            raise ValueError(f"benchmark.runtimes lists a runtime twice: {self.runtimes}")
        return self


class DistributedConfig(Section):
    """The training stages (baseline, recover) over several processes: torchrun starts
    nproc_per_node on each of nnodes machines; not in any fingerprint (the same global batch gives
    the same model, to float rounding, on any number of processes)."""
    nproc_per_node: PositiveInt = 1
    """Processes on each machine: one per GPU (or a share of the CPU cores)."""
    nnodes: PositiveInt = 1
    """Machines."""
    node_rank: int = Field(0, ge=0)
    """This machine's rank; node 0 hosts the rendezvous and writes the outputs."""
    rdzv_endpoint: Optional[str] = None
    """Several machines: node 0's host:port, e.g. 10.0.0.1:29500."""
    rdzv_timeout: PositiveInt = 300
    """Seconds a machine waits for the others to join."""

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


# A sweep method: (select.method, select.granularity or None for the configured one, replace overrides).
SWEEP_METHODS = {"sigma_h": ("sigma", "head", {}), "sigma_b": ("sigma", "block", {}),
                 "sigma_b_high": ("sigma_high", "block", {}), DSP: (DSP, None, {}), "random": ("random", None, {}),
                 "drop": ("sigma", None, {"variant": "drop"}), "identity": ("sigma", None, {"variant": "identity"}),
                 "folded": ("sigma", None, {"variant": "folded"}),
                 "gaussian": ("sigma", None, {"init": "gaussian"})}
TASK_RUNNERS = ("local", "dask")


class SweepConfig(Section):
    """python -m flows.sweep: replace + recover + evaluate for every (method, budget, seed) on one
    shared baseline and score file, then every model benchmarked together."""
    budgets: List[float] = Field([0.1667, 0.3333, 0.5], min_length=1)
    """Fractions of the heads (of the blocks for block methods): 1, 2, 3 of 6 blocks."""
    methods: List[Literal[tuple(SWEEP_METHODS)]] = Field(["sigma_b", "dsp", "random"], min_length=1)
    """sigma_h (heads by Sigma_h) | sigma_b (blocks by Sigma_b) | sigma_b_high (the blocks of highest Sigma_b, a
    control) | dsp (learned) | random (a control) | drop, identity (Sigma's choice removed outright, or its
    attention replaced by the identity) | folded (Sigma's choice, one kernel per block, folded for deployment) |
    gaussian (Sigma's choice, Gaussian kernels in place of the attention fit); dsp, random, drop, identity, folded,
    gaussian at select.granularity."""
    seeds: List[int] = Field([0], min_length=1)
    """One point per seed (the selection of random, recovery, DSP's noise)."""
    recover_epochs: Optional[int] = Field(3, ge=0)
    """Recovery epochs per point (null: recover.epochs); cut to fit 2 cores."""
    task_runner: Literal[TASK_RUNNERS] = "local"
    """local: points one after another | dask: on the Dask cluster at address."""
    address: Optional[str] = None
    """dask: the scheduler, e.g. tcp://10.0.0.1:8786."""

    @model_validator(mode="after")
    def _valid(self):
        if any(not 0 < b <= 1 for b in self.budgets):
            raise ValueError(f"sweep.budgets are fractions of the heads (or blocks), in (0, 1]; got {self.budgets}")
        if self.task_runner == "dask" and not self.address:
            raise ValueError("sweep.task_runner=dask needs sweep.address: the Dask scheduler, e.g. tcp://10.0.0.1:8786")
        for name in ("budgets", "methods", "seeds"):
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ValueError(f"sweep.{name} lists a value twice: {getattr(self, name)}")
        return self


class TrackingConfig(Section):
    tracking_uri: Optional[str] = None
    """null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project."""
    experiment: str = "convheads"


class RegistryConfig(Section):
    """Every run registers its compressed model as a version (alias challenger); the gate decides
    whether it becomes champion."""
    enabled: bool = True
    model_name: Optional[str] = None
    """null: convheads-<model.name> (convheads-<model.name>-segmentation)."""
    max_drop: float = Field(0.02, ge=0, le=1)
    """The gate: at most this drop of the task's headline metric (test top-1, or mIoU for segmentation) below the
    run's baseline, as a fraction (0.02 = 2 points) ..."""
    min_speedup: float = Field(1.0, gt=0)
    """... at least this fast vs the baseline ..."""
    speedup_batch_size: Optional[PositiveInt] = None
    """... at this benchmark batch size (null: the largest) ..."""
    must_beat_champion: bool = True
    """... and a better headline metric than the current champion's, on this run's test data ..."""
    min_improvement: float = Field(0.0, ge=0, le=1)
    """... by at least this much (0.005 = half a point); a rerun of the same never wins."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        old = [k for k in ("max_top1_drop", "max_miou_drop") if isinstance(data, dict) and k in data]
        if old:
            raise ValueError(f"registry.{old[0]} is now registry.max_drop (in the task's headline metric: top-1 for "
                             f"classification, mIoU for segmentation); rename the key")
        return data


class ScheduleConfig(Section):
    """`python -m flows.serve`: the compression flow as a Prefect deployment on a cron schedule."""
    deployment: str = "scheduled"
    cron: str = "0 3 * * *"
    """Every day at 03:00."""
    timezone: str = "UTC"


class PipelineConfig(Section):
    task: Literal[TASKS] = "classification"
    """classification | segmentation."""
    seed: int = 0
    device: str = "auto"
    """auto (cuda when there is a GPU) | cpu | cuda | cuda:N."""
    precision: Literal[PRECISIONS] = "fp32"
    """fp32 | bf16 | fp16: autocast in training, scoring, evaluation and benchmarks (fp16 scales the loss, and
    needs a GPU)."""
    distributed: DistributedConfig = DistributedConfig()
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    baseline: TrainConfig
    """Stage baseline: fine-tune the ViT on the task."""
    score: ScoreConfig = ScoreConfig()
    select: SelectConfig = SelectConfig()
    replace: ReplaceConfig = ReplaceConfig()
    recover: TrainConfig
    """Stage recover: fine-tune the replaced model to recover accuracy."""
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    loader: LoaderConfig = LoaderConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    tracking: TrackingConfig = TrackingConfig()
    registry: RegistryConfig = RegistryConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data):
        """Fill in the training settings the configuration leaves out (or null) with the task's."""
        if not isinstance(data, dict):
            return data
        defaults = TASK_DEFAULTS.get(data.get("task", cls.model_fields["task"].default))
        if defaults is None:  # not a task: its own field says so
            return data
        data = dict(data)
        for stage, values in defaults.items():
            given = data.get(stage) or {}
            if isinstance(given, dict):
                data[stage] = {**given, **{k: v for k, v in values.items() if given.get(k) is None}}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.device not in DEVICES and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N)")
        if self.replace.variant in BLOCK_VARIANTS and self.select.blocks is None and self.select.granularity != "block":
            raise ValueError(f"replace.variant={self.replace.variant} merges whole blocks; set "
                             f"select.granularity=block (or select.blocks)")
        if self.select.method in ("fit", "sigma_fit") and self.replace.variant not in FITTED:
            raise ValueError(f"select.method={self.select.method} ranks heads by the fit of replace.variant, and "
                             f"{self.replace.variant} has none (variants with one: {', '.join(FITTED)}); use "
                             f"select.method=sigma")
        if self.select.method == DSP and self.replace.variant not in CONV_VARIANTS:
            raise ValueError(f"select.method=dsp gates a convolution branch: replace.variant must be one of "
                             f"{CONV_VARIANTS}")
        crops = self.data.photos
        if self.pretrain.scale[1] * crops.crop > crops.tile:
            raise ValueError(f"pretrain.scale's largest crop ({self.pretrain.scale[1]} x data.photos.crop = "
                             f"{self.pretrain.scale[1] * crops.crop:g} px) is larger than a tile ({crops.tile} px): "
                             f"lower pretrain.scale or raise data.photos.tile")
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

    @property
    def gate_batch_size(self) -> int:
        return self.registry.speedup_batch_size or max(self.benchmark.batch_sizes)

    @property
    def benchmark_runtimes(self) -> List[str]:
        """benchmark.runtimes that time the device the models run on: onnxruntime (and its INT8) times
        the CPU, so it is left out on a GPU (eager then, if nothing else is left)."""
        cpu = resolve_device(self.device) == "cpu"
        return [r for r in self.benchmark.runtimes if r not in ONNX_RUNTIMES or cpu] or ["eager"]

    @property
    def int8(self) -> bool:
        """Whether the compressed model is deployed in INT8 too (onnxruntime-int8 among the runtimes
        benchmarked): the evaluate stage then measures its accuracy."""
        return INT8_RUNTIME in self.benchmark_runtimes

    def section(self, *names: str) -> dict:
        """The named sections as plain data (what a stage's fingerprint depends on, what MLflow
        records); the segmentation section is None unless task is segmentation (it changes nothing else)."""
        data = self.model_dump(mode="json", include=set(names))
        if "segmentation" in names and self.task != "segmentation":
            data["segmentation"] = None
        return data


def _explain(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        unknown = err["type"] in ("extra_forbidden", "unexpected_keyword_argument")
        msg = "unknown key" if unknown else err["msg"].removeprefix("Value error, ")
        field = re.match(r"(\w+) (must .*)", msg)  # a library settings check: "<field> must be ...; got ..."
        if field:
            key, msg = f"{key}.{field.group(1)}", field.group(2)
        shown = not unknown and not isinstance(err["input"], dict) and err["type"] != "value_error"
        lines.append(f"  {key}: {msg}" + (f" (got {err['input']!r})" if shown else ""))
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
    """params.yaml (if it exists; missing keys take their defaults) with key=value overrides on top, validated."""
    data: dict = {}
    if params_file and params_file != "params.yaml" and not Path(params_file).is_file():
        raise ConvHeadsError(f"the configuration file {params_file} does not exist (presets: "
                             f"{', '.join(str(p) for p in sorted(Path('presets').glob('*.yaml')))})")
    if params_file and Path(params_file).exists():
        try:
            data = yaml.safe_load(Path(params_file).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConvHeadsError(f"{params_file} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConvHeadsError(f"{params_file} holds {type(data).__name__}, not a mapping of settings")
    return validate(merge(data, parse_overrides(overrides or [])))


def photo_settings(data: DataConfig) -> PhotoSettings:
    """How the data section cuts crops of the photographs (the data stage's and the pretrain stage's)."""
    return PhotoSettings(tile=data.photos.tile, crop=data.photos.crop, image_size=data.image_size,
                         val_fraction=data.val_fraction, test_fraction=data.test_fraction, seed=data.seed)


def tiny_params(root) -> dict:
    """A configuration (as params.yaml would hold it) that runs every stage in seconds, everything
    under `root`: a 2-block ViT on 16 px digits. For smoke runs (the tests, the device check)."""
    cfg = PipelineConfig.model_validate({}).model_dump(mode="json")
    cfg["paths"] = {"data": f"{root}/data/dataset", "outputs": f"{root}/outputs"}
    cfg["data"]["image_size"] = 16
    cfg["model"]["kwargs"] = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 4}
    cfg["baseline"].update(epochs=2, batch_size=64)
    cfg["recover"].update(epochs=1, batch_size=64)
    cfg["score"]["max_images"] = 32
    cfg["pretrain"].update(steps=3, batch_size=8, warmup_steps=1, save_every=1, kwargs=cfg["model"]["kwargs"])
    cfg["benchmark"].update(batch_sizes=[1, 4], repeats=2, warmup=1)
    cfg["tracking"]["tracking_uri"] = f"sqlite:///{root}/mlflow.db"
    return cfg
